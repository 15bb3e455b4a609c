"""`kubeonnx infer`: send a JSON request, a .npy array or an image to a model and print the answer.

A user's first request, without writing the Open Inference Protocol by hand: the standard
library's HTTP client and numpy, nothing the runtime image does not already hold.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .datatypes import OIP_TO_NUMPY, oip_datatype

# What the runtime's /predict decodes (images.FORMATS: JPEG, PNG, WebP).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Images it does not: refused here, before anything is sent.
OTHER_IMAGE_SUFFIXES = (".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif", ".ico")
TIMEOUT_S = 60.0
# RFC 9110's token: what a header name may hold.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class InferFailed(Exception):
    """What to print instead of an answer: the server's message, or why there was none."""


def shown(url: str) -> str:
    """URL as it may be printed: any user and password in it replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def server_url(url: str) -> str:
    """URL with http:// added when it names no scheme (127.0.0.1:8080); InferFailed for
    another scheme, or for credentials in it (they would be in `ps`: -H @FILE sends them)."""
    if "://" not in url:
        url = f"http://{url}"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InferFailed(f"{shown(url)}: not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise InferFailed(f"{shown(url)}: URL must start with http:// or https://")
    if "@" in parts.netloc:
        raise InferFailed(
            f"{shown(url)}: URL must not carry credentials (other users of the machine can read "
            "the command line): put the header that carries them in a file and give -H @FILE"
        )
    if not parts.hostname:
        raise InferFailed(f"{url}: URL names no host")
    return url


def parse_headers(given: list[str]) -> dict[str, str]:
    """The headers of -H 'Name: value' and -H @FILE (one 'Name: value' a line; blank lines
    and lines starting with # skipped), or InferFailed naming the one that is not a header.
    A value is never printed: it may be a key."""
    lines: list[tuple[str, str]] = []
    for item in given:
        if item.startswith("@"):
            try:
                text = Path(item[1:]).read_text()
            except OSError as exc:
                raise InferFailed(f"-H {item}: {exc.strerror or exc}") from None
            lines += [
                (f"-H {item} line {n}", line.strip())
                for n, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
        else:
            lines.append(("-H", item))
    headers: dict[str, str] = {}
    for where, line in lines:
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not HEADER_NAME.match(name) or any(c in value for c in "\r\n\0"):
            what = repr(name) if HEADER_NAME.match(name) else "its name"
            raise InferFailed(f"{where}: not a header 'Name: value' ({what})")
        headers[name] = value
    return headers


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


def _send(
    url: str,
    body: bytes | None,
    content_type: str | None,
    extra: dict[str, str] | None = None,
) -> tuple[bytes, str]:
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    headers.update(extra or {})  # as curl: the user's headers win
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


def _only_input(url: str, headers: dict[str, str]) -> str:
    """The model's only input, from its metadata (the URL without its action)."""
    metadata_url = url.rsplit("/", 1)[0]
    body, _ = _send(metadata_url, None, None, headers)
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


def _request(args: argparse.Namespace, headers: dict[str, str]) -> tuple[str, bytes, str]:
    """URL, body and content type of the request FILE makes."""
    path = Path(args.file)
    suffix = path.suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise InferFailed(
            f"{args.file}: the server decodes JPEG, PNG and WebP images only "
            f"({', '.join(IMAGE_SUFFIXES)}): convert it to one of them"
        )
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
        name = args.input or _only_input(url, headers)
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
        "Open Inference Protocol request as it is, a .npy array becomes the model's input, a "
        "JPEG, PNG or WebP image is sent to /predict (models with spec.processing).",
    )
    parser.add_argument(
        "url",
        metavar="URL",
        help="the server (http://127.0.0.1:8080, status.url of an InferenceModel; http:// "
        "when it names no scheme), a model (…/v2/models/NAME) or the endpoint itself "
        "(…/infer, …/predict); never with credentials in it (-H @FILE sends them)",
    )
    parser.add_argument(
        "file",
        metavar="FILE",
        help="a .json request, a .npy array or a JPEG, PNG or WebP image (.jpg, .jpeg, .png, "
        ".webp) ('-': JSON on stdin)",
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
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="HEADER",
        help="send 'Name: value' as a header, as curl does (repeatable); @FILE: the headers "
        "in FILE, one 'Name: value' a line. A QuotaPolicy's API key goes in its tenantHeader "
        "(X-Api-Key by default, or 'Authorization: Bearer KEY'): give it as -H @FILE, since "
        "a command line is seen by every user of the machine (ps)",
    )
    parser.add_argument("--raw", action="store_true", help="print the answer's JSON as it came")
    args = parser.parse_args(argv)
    try:
        headers = parse_headers(args.header)
        args.url = server_url(args.url)
        url, body, content_type = _request(args, headers)
        answer, answer_type = _send(url, body, content_type, headers)
    except InferFailed as exc:
        print(f"kubeonnx infer: {exc}", file=sys.stderr)
        return 1
    if args.raw or "json" not in answer_type:
        sys.stdout.write(answer.decode("utf-8", "replace").rstrip("\n") + "\n")
    else:
        print(describe(json.loads(answer)))
    return 0
