"""The ONNX model: an onnxruntime session, its metadata, and validation of inputs against it.

This is the only module that imports onnxruntime.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .datatypes import OIP_TO_NUMPY, ONNX_TO_OIP, TensorSpec
from .errors import FatalStartupError, InvalidRequest

log = logging.getLogger(__name__)

_InvalidArgument = ort.capi.onnxruntime_pybind11_state.InvalidArgument
# "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " and source locations ("/src/.../gather.cc:86 ")
_ORT_NOISE = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : |\S+\.(?:cc|h|cpp):\d+ (?:\S+ )?")


def _as_strings(arr: np.ndarray, name: str) -> np.ndarray:
    """onnxruntime takes string tensors as object arrays of str; BYTES arrive as bytes, which
    must be UTF-8 (onnxruntime would otherwise turn them into their Python repr)."""
    out = np.empty(arr.shape, dtype=np.object_)
    flat = out.ravel()
    for i, x in enumerate(arr.ravel()):
        try:
            flat[i] = x.decode() if isinstance(x, bytes) else str(x)
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"input '{name}': element {i} is not UTF-8; the model's string inputs take text"
            ) from None
    return out


def model_error(exc: Exception) -> str:
    """onnxruntime's message without its error-code prefix and source file locations."""
    return _ORT_NOISE.sub("", " ".join(str(exc).split())).strip()


def _tensor_spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ONNX_TO_OIP.get(arg.type)
    if datatype is None:
        raise FatalStartupError(
            f"model tensor '{arg.name}' has type {arg.type}, which the runtime cannot serve"
        )
    dims = arg.shape or []
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
    named = tuple((axis, d) for axis, d in enumerate(dims) if isinstance(d, str) and d)
    return TensorSpec(arg.name, datatype, shape, named)


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

    def __init__(
        self, path: Path, *, device: str = "cpu", threads: int = 0, spin: bool = True
    ) -> None:
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
        if not spin:
            # Idle intra-op threads otherwise spin for work, taking the CPUs that other
            # threads of the process (image decoding) need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        self.output_names = [t.name for t in self.outputs]
        # Requests can be merged along the first dimension only when every input and
        # output has a dynamic one.
        self.batchable = all(t.shape and t.shape[0] == -1 for t in [*self.inputs, *self.outputs])

    def check_outputs(self, names: list[str]) -> None:
        """Raise InvalidRequest naming the first requested output the model does not have."""
        for name in names:
            if name not in self.output_names:
                raise InvalidRequest(
                    f"unknown output '{name}'; the model's outputs are "
                    + ", ".join(self.output_names)
                )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: (_as_strings(v, k) if v.dtype == np.object_ else v) for k, v in inputs.items()}
        try:
            results = self.session.run(self.output_names, feed)
        except _InvalidArgument as exc:  # the values, not the server, are at fault
            raise InvalidRequest(
                f"the model cannot run on this input: {model_error(exc)}"
            ) from None
        return dict(zip(self.output_names, results, strict=True))

    def warm_up(self) -> bool:
        """Run once on zeros so the first real request pays no lazy initialisation.

        Dynamic dimensions are first filled with 1; a model that cannot run on that (a
        convolution without padding needs at least its kernel's size) is tried once more with
        64 in every dynamic dimension but the first. A model that runs on neither is still
        served, unwarmed, and the log says so: zeros are not every model's valid input."""
        problems = []
        for fill in (1, 64):
            feed: dict[str, np.ndarray] = {}
            for spec in self.inputs:
                shape = tuple(
                    (1 if i == 0 else fill) if d == -1 else d for i, d in enumerate(spec.shape)
                )
                dtype = OIP_TO_NUMPY[spec.datatype]
                feed[spec.name] = (
                    np.full(shape, b"", dtype=np.object_)
                    if dtype == np.object_
                    else np.zeros(shape, dtype)
                )
            try:
                self.run(feed)
                return True
            except Exception as exc:
                problems.append(
                    f"{ {k: list(v.shape) for k, v in feed.items()} }: {model_error(exc)}"
                )
            if all(d != -1 for spec in self.inputs for d in spec.shape[1:]):
                break  # nothing else to vary
        log.warning(
            "warm-up skipped: the model did not run on zeros; the first request pays for "
            "initialisation",
            extra={"attempts": problems},
        )
        return False
