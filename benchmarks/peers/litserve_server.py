"""LitServe peer: `python litserve_server.py MODEL.onnx PORT`. POST /predict with
{"input": [[row]]} answers {"output": [[...]]}; LitServe batches up to PEER_MAX_BATCH
requests, waiting at most PEER_MAX_WAIT_MS, into one session.run. PEER_FAST_QUEUE=1 turns on
its fast_queue (ZeroMQ between the API server and the inference worker)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import litserve as ls
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MAX_BATCH, MAX_WAIT_S, run, session


class OnnxAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.session = session(sys.argv[1])

    def decode_request(self, request: dict) -> np.ndarray:
        return np.asarray(request["input"], dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return run(self.session, x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, output: np.ndarray) -> dict:
        return {"output": output.tolist()}


if __name__ == "__main__":
    api = OnnxAPI(max_batch_size=MAX_BATCH, batch_timeout=MAX_WAIT_S)
    # fast_queue: LitServe's ZeroMQ queues instead of multiprocessing's (PEER_FAST_QUEUE=1).
    fast = os.environ.get("PEER_FAST_QUEUE") == "1"
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, fast_queue=fast)
    server.run(
        host="127.0.0.1",
        port=int(sys.argv[2]),
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )
