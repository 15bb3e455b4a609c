"""The ONNX model: an onnxruntime session, its metadata, and validation of inputs against it.

This is the only module that imports onnxruntime.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .datatypes import OIP_TO_NUMPY, ONNX_TO_OIP
from .errors import FatalStartupError, InvalidRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension

    def metadata(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


_InvalidArgument = ort.capi.onnxruntime_pybind11_state.InvalidArgument


def _as_strings(arr: np.ndarray) -> np.ndarray:
    """onnxruntime takes string tensors as object arrays of str; BYTES arrive as bytes."""
    out = np.empty(arr.shape, dtype=np.object_)
    out.ravel()[:] = [
        x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.ravel()
    ]
    return out


def _tensor_spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ONNX_TO_OIP.get(arg.type)
    if datatype is None:
        raise FatalStartupError(
            f"model tensor '{arg.name}' has type {arg.type}, which the runtime cannot serve"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def cpu_quota_threads(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Whole CPUs the container may use: its cgroup CPU quota, else the machine's CPU count."""
    cpus = os.cpu_count() or 1
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]  # cgroup v2
        if quota != "max":
            return max(1, min(cpus, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0:
            return max(1, min(cpus, math.ceil(quota_us / period_us)))
    except (OSError, ValueError):
        pass
    return cpus


class OnnxModel:
    """One loaded model. `run` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, path: Path, *, device: str = "cpu", threads: int = 0) -> None:
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise FatalStartupError(
                    "device 'cuda' asked for but onnxruntime has no CUDA execution provider "
                    f"(available: {', '.join(available)}); use the runtime's CUDA image"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device != "cpu":
            raise FatalStartupError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_quota_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        started = time.monotonic()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
            raise FatalStartupError(
                f"{path.name} is not a loadable ONNX model: {first_line}"
            ) from None
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise FatalStartupError(
                "CUDA execution provider failed to initialise (no GPU visible to the container?)"
            )
        self.load_seconds = time.monotonic() - started
        self.device = device
        self.threads = options.intra_op_num_threads
        self.inputs = [_tensor_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_tensor_spec(a) for a in self.session.get_outputs()]
        self._inputs_by_name = {t.name: t for t in self.inputs}
        self.output_names = [t.name for t in self.outputs]
        # Requests can be merged along the first dimension only when every input and
        # output has a dynamic one.
        self.batchable = all(t.shape and t.shape[0] == -1 for t in [*self.inputs, *self.outputs])

    def validate(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> None:
        """Raise InvalidRequest naming the first input or output that does not fit the model."""
        for name in inputs:
            if name not in self._inputs_by_name:
                raise InvalidRequest(
                    f"unknown input '{name}'; the model's inputs are "
                    + ", ".join(t.name for t in self.inputs)
                )
        for spec in self.inputs:
            arr = inputs.get(spec.name)
            if arr is None:
                raise InvalidRequest(f"missing input '{spec.name}'")
            want = OIP_TO_NUMPY[spec.datatype]
            if arr.dtype != want:
                got = "BYTES" if arr.dtype == np.object_ else str(arr.dtype).upper()
                raise InvalidRequest(
                    f"input '{spec.name}' has datatype {got}; the model takes {spec.datatype}"
                )
            if len(arr.shape) != len(spec.shape) or any(
                d != -1 and d != g for d, g in zip(spec.shape, arr.shape, strict=True)
            ):
                raise InvalidRequest(
                    f"input '{spec.name}' has shape {list(arr.shape)}; the model takes "
                    f"{list(spec.shape)} (-1 is any size)"
                )
        for name in outputs or []:
            if name not in self.output_names:
                raise InvalidRequest(
                    f"unknown output '{name}'; the model's outputs are "
                    + ", ".join(self.output_names)
                )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: (_as_strings(v) if v.dtype == np.object_ else v) for k, v in inputs.items()}
        try:
            results = self.session.run(self.output_names, feed)
        except _InvalidArgument as exc:  # the values, not the server, are at fault
            raise InvalidRequest(f"the model rejected the input: {exc}") from None
        return dict(zip(self.output_names, results, strict=True))

    def warm_up(self) -> None:
        """Run once on zeros so the first real request pays no lazy initialisation."""
        feed: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            dtype = OIP_TO_NUMPY[spec.datatype]
            feed[spec.name] = (
                np.full(shape, b"", dtype=np.object_)
                if dtype == np.object_
                else np.zeros(shape, dtype)
            )
        self.run(feed)
