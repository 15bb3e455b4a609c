"""The peer for the runtime benchmark: an MLServer model wrapping the same onnxruntime session
as kubeonnx (one intra-op thread), served by MLServer with its default settings."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        uri = self.settings.parameters.uri if self.settings.parameters else None
        self.session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {i.name: NumpyCodec.decode_input(i).astype(np.float32) for i in payload.inputs}
        outputs = self.session.run(self.output_names, feed)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(n, v)
                for n, v in zip(self.output_names, outputs, strict=True)
            ],
        )
