"""The image-classification baseline users start from: FastAPI's UploadFile, Pillow and one
session.run per image, all in the request handler.

python benchmarks/naive_image_server.py MODEL.onnx PORT THREADS
"""

from __future__ import annotations

import io
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

model_path, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LABELS = [str(i) for i in range(10)]
app = FastAPI()


@app.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@app.post("/v2/models/{name}/predict")
async def predict(name: str, file: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008
    img = Image.open(io.BytesIO(await file.read())).convert("RGB").resize((32, 32))
    x = (np.asarray(img, dtype=np.float32) / 255 - MEAN) / STD
    logits = session.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0]
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    top = np.argsort(-scores)[:3]
    return {
        "model": name,
        "predictions": [
            {"label": LABELS[i], "index": int(i), "score": float(scores[i])} for i in top
        ],
    }


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
