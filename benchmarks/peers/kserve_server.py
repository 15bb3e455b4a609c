"""KServe peer: `python kserve_server.py MODEL.onnx NAME PORT`. The KServe Python model server
(Open Inference Protocol v2, JSON and binary tensors) with a custom Model that calls the same
onnxruntime session. The Python server has no batcher of its own: KServe batches in its agent
sidecar (a Go binary, not on PyPI), so each request is one session.run here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.protocol.rest import server as rest_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run, session


class OnnxModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.session = session(path)
        self.ready = True

    async def predict(self, payload, headers=None, response_headers=None):  # type: ignore[override]
        assert isinstance(payload, InferRequest)
        y = run(self.session, payload.inputs[0].as_numpy())
        binary = payload.use_binary_outputs
        out = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=binary)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[out],
            use_binary_outputs=binary,
        )


class LoopbackConfig(uvicorn.Config):
    """KServe's REST server binds 0.0.0.0 with no option to change it; the benchmark binds
    loopback only."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


if __name__ == "__main__":
    path, name, port = sys.argv[1:4]
    rest_server.uvicorn.Config = LoopbackConfig  # type: ignore[misc]
    server = ModelServer(
        http_port=int(port), enable_grpc=False, workers=1, enable_latency_logging=False
    )
    for logger in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    server.start([OnnxModel(name, path)])
