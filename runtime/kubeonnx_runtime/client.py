"""`kubeonnx infer`: send a JSON request, a .npy array or an image to a model and print the answer.

A user's first request, without writing the Open Inference Protocol by hand: the standard
library's HTTP client and numpy, nothing the runtime image does not already hold.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .datatypes import OIP_TO_NUMPY, oip_datatype

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TIMEOUT_S = 60.0


class InferFailed(Exception):
    """What to print instead of an answer: the server's message, or why there was none."""


def endpoint(url: str, model: str, action: str) -> str:
    """The URL to POST to: URL itself when it names the action (…/infer, …/predict), URL plus
    the action when it names a model (…/v2/models/NAME[/versions/V]), else URL's
    /v2/models/MODEL/ACTION (URL is the server, with any route prefix)."""
    base = url.rstrip("/")
    path = urlsplit(base).path
    if path.endswith(("/infer", "/predict")):
        return base
    if "/v2/models/" in path:
        return f"{base}/{action}"
    return f"{base}/v2/models/{model}/{action}"


def _send(url: str, body: bytes | None, content_type: str | None) -> tuple[bytes, str]:
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            message = json.loads(text).get("error") or text
        except (ValueError, AttributeError):
            message = text.strip() or exc.reason
        raise InferFailed(f"{url}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InferFailed(f"{url}: {reason}") from None


def _only_input(url: str) -> str:
    """The model's only input, from its metadata (the URL without its action)."""
    metadata_url = url.rsplit("/", 1)[0]
    body, _ = _send(metadata_url, None, None)
    inputs = json.loads(body).get("inputs") or []
    if len(inputs) != 1:
        names = ", ".join(i.get("name", "?") for i in inputs)
        raise InferFailed(f"the model has inputs {names}: name the one to fill with --input")
    return str(inputs[0]["name"])


def npy_request(array: np.ndarray, name: str) -> dict[str, Any]:
    """An Open Inference Protocol request with ARRAY as the input NAME."""
    try:
        datatype = oip_datatype(array)
    except ValueError:
        known = ", ".join(str(d) for d in OIP_TO_NUMPY.values() if d != np.object_)
        raise InferFailed(
            f"a .npy of dtype {array.dtype} has no protocol datatype ({known})"
        ) from None
    data = array.astype(str).ravel().tolist() if datatype == "BYTES" else array.ravel().tolist()
    return {
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}]
    }


def describe(answer: Any) -> str:
    """The answer as a person reads it: each output's name, type and shape, then its values as
    an array; anything else (/predict's labels and boxes) as indented JSON."""
    if not isinstance(answer, dict) or not isinstance(answer.get("outputs"), list):
        return json.dumps(answer, indent=2)
    lines = [f"model {answer.get('model_name', '?')} version {answer.get('model_version', '?')}"]
    for output in answer["outputs"]:
        shape = output.get("shape", [])
        lines.append(f"{output.get('name')} {output.get('datatype')} {shape}")
        data = output.get("data")
        try:
            values = np.asarray(data).reshape(shape)
            lines.append(np.array2string(values, threshold=200, edgeitems=4, precision=5))
        except (ValueError, TypeError):
            lines.append(json.dumps(data))
    return "\n".join(lines)


def _request(args: argparse.Namespace) -> tuple[str, bytes, str]:
    """URL, body and content type of the request FILE makes."""
    path = Path(args.file)
    suffix = path.suffix.lower()
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else path.read_bytes()
    except OSError as exc:
        raise InferFailed(f"{args.file}: {exc.strerror or exc}") from None
    if suffix in IMAGE_SUFFIXES:
        return endpoint(args.url, args.model, "predict"), raw, "application/octet-stream"
    url = endpoint(args.url, args.model, "infer")
    if suffix == ".npy":
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as exc:
            raise InferFailed(f"{args.file}: not a .npy array: {exc}") from None
        name = args.input or _only_input(url)
        return url, json.dumps(npy_request(array, name)).encode(), "application/json"
    try:
        json.loads(raw)
    except ValueError as exc:
        raise InferFailed(
            f"{args.file}: not JSON ({exc}); give a .json request, a .npy array or an image "
            f"({', '.join(IMAGE_SUFFIXES)})"
        ) from None
    return url, raw, "application/json"


def infer_command(argv: list[str]) -> int:
    """`kubeonnx infer URL FILE`: 0 and the answer printed, or 1 and the server's message."""
    parser = argparse.ArgumentParser(
        prog="kubeonnx infer",
        description="Send FILE to a model and print its answer: a .json file is sent as the "
        "Open Inference Protocol request as it is, a .npy array becomes the model's input, an "
        "image is sent to /predict (models with spec.processing).",
    )
    parser.add_argument(
        "url",
        metavar="URL",
        help="the server (http://127.0.0.1:8080, status.url of an InferenceModel), a model "
        "(…/v2/models/NAME) or the endpoint itself (…/infer, …/predict)",
    )
    parser.add_argument(
        "file",
        metavar="FILE",
        help="a .json request, a .npy array or an image ('-': JSON on stdin)",
    )
    parser.add_argument(
        "--model",
        default="model",
        help="the model's name when URL is the server (default: model, the name of a runtime "
        "started by hand; an InferenceModel's is its metadata.name)",
    )
    parser.add_argument(
        "--input", help="the input a .npy array fills (default: the model's only input)"
    )
    parser.add_argument("--raw", action="store_true", help="print the answer's JSON as it came")
    args = parser.parse_args(argv)
    try:
        url, body, content_type = _request(args)
        answer, answer_type = _send(url, body, content_type)
    except InferFailed as exc:
        print(f"kubeonnx infer: {exc}", file=sys.stderr)
        return 1
    if args.raw or "json" not in answer_type:
        sys.stdout.write(answer.decode("utf-8", "replace").rstrip("\n") + "\n")
    else:
        print(describe(json.loads(answer)))
    return 0
