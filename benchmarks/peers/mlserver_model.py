"""MLServer peer: an MLServer model wrapping the same onnxruntime session as kubeonnx (one
intra-op thread). With adaptive batching on (max_batch_size, max_batch_time in its
model-settings.json), MLServer merges requests into one payload whose first dimension is the
batch, and splits the answer back."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run, session


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        self.session = session(str(uri))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("output", run(self.session, x))]
        )
