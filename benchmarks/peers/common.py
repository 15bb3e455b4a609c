"""What every peer adapter shares: the model's onnxruntime session, built as kubeonnx builds
its own for the benchmark (one intra-op thread, CPU provider). Imported by the adapters in
their own virtual environments, so it needs only onnxruntime and numpy."""

from __future__ import annotations

import os
import time

import numpy as np
import onnxruntime as ort

# The batching every peer gets, as kubeonnx's benchmark runs with KUBEONNX_MAX_BATCH_SIZE=32
# and its default 2 ms wait.
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "32"))
MAX_WAIT_S = float(os.environ.get("PEER_MAX_WAIT_MS", "2")) / 1000


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


# Rows and runs so far, written to PEER_STATS.<pid> at most every STATS_EVERY_S seconds (at a
# run), so the benchmark can tell how full the peer's batches were.
STATS = os.environ.get("PEER_STATS")
STATS_EVERY_S = 0.1
_runs = 0
_rows = 0
_written = 0.0


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """The model's one output for a batch of rows."""
    global _runs, _rows, _written
    out = sess.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]
    _runs += 1
    _rows += len(x)
    if STATS and time.monotonic() - _written > STATS_EVERY_S:
        _written = time.monotonic()
        tmp = f"{STATS}-tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{_runs} {_rows}\n")
        os.replace(tmp, f"{STATS}.{os.getpid()}")
    return out
