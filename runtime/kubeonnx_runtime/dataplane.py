"""The data plane: health, metadata and inference on numpy arrays, with no web framework in it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import numpy as np

from .batching import Batcher, Reservation
from .codec import InferRequest, decode_request
from .datatypes import TensorSpec
from .errors import ModelNotFound

try:
    SERVER_VERSION = version("kubeonnx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    SERVER_VERSION = "0+unknown"


class ServedModel(Protocol):
    """What the data plane needs of a model (OnnxModel, or a stand-in in unit tests)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    output_names: list[str]
    device: str

    def check_outputs(self, names: list[str]) -> None: ...


class DataPlane:
    """The model's data plane; without a model (`kubeonnx serve --role gateway`) it checks
    requests as far as the protocol goes and runs none."""

    def __init__(
        self,
        model: ServedModel | None,
        batcher: Batcher | None,
        *,
        name: str,
        version: str,
        max_json_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.max_json_bytes = max_json_bytes
        self.batcher = batcher
        self.name = name
        self.version = version
        self.draining = False
        self._inputs = {t.name: t for t in model.inputs} if model is not None else None

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "kubeonnx",
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data"],
        }

    def check_model(self, name: str, version: str | None) -> None:
        if name != self.name:
            raise ModelNotFound(
                f"model '{name}' is not served here; this server serves '{self.name}'"
            )
        if version not in (None, "", self.version):
            raise ModelNotFound(
                f"model '{name}' has no version '{version}'; the served version is '{self.version}'"
            )

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self.check_model(name, version)
        metadata: dict[str, Any] = {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
        }
        if self.model is not None:
            metadata["inputs"] = [t.metadata() for t in self.model.inputs]
            metadata["outputs"] = [t.metadata() for t in self.model.outputs]
        return metadata

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.check_model(name, version)
        return self.ready()

    def decode(self, body: bytes, header_length: int | None) -> InferRequest:
        """Decode a request body, checking it against the model before reading tensor data;
        the caller has checked the model's name (`check_model`) before reading the body."""
        request = decode_request(body, header_length, self._inputs, self.max_json_bytes)
        if request.outputs is not None and self.model is not None:
            self.model.check_outputs([o.name for o in request.outputs])
        return request

    def check_runs(self) -> None:
        """Refuse (404) a synchronous request where no model runs (the gateway)."""
        if self.batcher is None:
            raise ModelNotFound(
                f"this is the asynchronous gateway of model '{self.name}': it runs no model; "
                f"submit with POST /v2/models/{self.name}/async-infer"
            )

    async def infer(
        self, request: InferRequest, reservation: Reservation | None = None
    ) -> dict[str, np.ndarray]:
        """Run the request (in a place of `reservation`, if given: `Batcher.reserve`)."""
        self.check_runs()
        assert self.batcher is not None
        return await self.batcher.infer(request.inputs, reservation)
