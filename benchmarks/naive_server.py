"""The baseline users start from: FastAPI, one request -> one session.run, stdlib json.

python benchmarks/naive_server.py MODEL.onnx PORT THREADS
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request, Response

model_path, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.get("/v2/health/live")
async def live() -> Response:  # what the benchmark waits for before it loads the server
    return Response(b'{"live":true}', media_type="application/json")


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> Response:
    body = json.loads(await request.body())
    feed = {
        i["name"]: np.asarray(i["data"], dtype=np.float32).reshape(i["shape"])
        for i in body["inputs"]
    }
    outputs = session.run(None, feed)
    result = {
        "model_name": name,
        "outputs": [
            {"name": o.name, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
            for o, v in zip(session.get_outputs(), outputs, strict=True)
        ],
    }
    return Response(json.dumps(result), media_type="application/json")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
