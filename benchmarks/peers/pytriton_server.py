"""Triton peer through PyTriton: `python pytriton_server.py MODEL.onnx NAME PORT`. Triton's HTTP
front end (Open Inference Protocol v2, JSON and binary tensors) with its dynamic batcher
(max batch PEER_MAX_BATCH, queue delay PEER_MAX_WAIT_MS) in front of a Python function that
calls the same onnxruntime session."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MAX_BATCH, MAX_WAIT_S, run, session


def main() -> None:
    path, name, port, grpc_port, metrics_port = sys.argv[1:6]
    sess = session(path)
    row_in = tuple(sess.get_inputs()[0].shape[1:])
    row_out = tuple(sess.get_outputs()[0].shape[1:])

    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:
        return {"output": run(sess, input)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(port),
        grpc_address="127.0.0.1",
        grpc_port=int(grpc_port),
        metrics_port=int(metrics_port),
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=row_in)],
            outputs=[Tensor(name="output", dtype=np.float32, shape=row_out)],
            config=ModelConfig(
                max_batch_size=MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(MAX_WAIT_S * 1e6)),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
