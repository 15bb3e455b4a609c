"""BentoML peer: `bentoml serve bentoml_service:Onnx --port PORT` with PEER_MODEL set to the
model's path. POST /predict with {"input": [[row]]} answers [[...]]; BentoML's adaptive
batching merges up to PEER_MAX_BATCH requests into one session.run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MAX_BATCH, run, session

# BentoML has no wait knob: its dispatcher picks the wait from the batch costs it measures,
# bounded by max_latency_ms (a request that cannot be answered in time is refused, 503).
MAX_LATENCY_MS = int(os.environ.get("PEER_MAX_LATENCY_MS", "60000"))


@bentoml.service(workers=1, threads=1)
class Onnx:
    def __init__(self) -> None:
        self.session = session(os.environ["PEER_MODEL"])

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, input: np.ndarray) -> np.ndarray:
        return run(self.session, input)
