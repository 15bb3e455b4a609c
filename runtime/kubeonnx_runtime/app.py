"""The HTTP layer: the Open Inference Protocol v2 REST API over a DataPlane.

The only module that imports FastAPI. Endpoints are thin: they decode, call the data plane,
encode. Domain errors become HTTP status codes in one place (`_error_response`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .asyncinfer import AsyncStore, QueueFull, QueueUnavailable, RequestNotFound, status_document
from .codec import HEADER_LENGTH, InferRequest, encode_response, json_limit_message
from .dataplane import DataPlane
from .datatypes import OIP_TO_NUMPY
from .errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RuntimeServeError,
    ServerBusy,
)
from .images import DecodeBudget, ImagePipeline, OpenedImage, parse_multipart
from .ledger import Ledger
from .logs import request_id_var
from .metrics import RuntimeMetrics
from .quota import (
    Decision,
    OverWholeLimit,
    Quota,
    QuotaExceeded,
    QuotaUnavailable,
    Unauthorized,
)
from .router import is_mirror_copy
from .tokens import count_tokens

log = logging.getLogger(__name__)

_STATUS: dict[type[RuntimeServeError], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    ModelNotFound: 404,
    RequestNotFound: 404,
    PayloadTooLarge: 413,
    OverWholeLimit: 413,  # no Retry-After: no wait admits it
    QuotaExceeded: 429,
    ServerBusy: 503,
    QueueFull: 503,
    QueueUnavailable: 503,
    QuotaUnavailable: 503,
}
# Bodies up to this size are decoded on the event loop (well under a millisecond); larger or
# compressed ones on a thread of their own, so the loop keeps answering probes meanwhile.
DECODE_INLINE_BELOW = 256 * 1024
# What a 413 adds when the asynchronous entry limit, not the request limit, refused the body.
ASYNC_ENTRY_LIMIT = (
    " for an asynchronous request (spec.async.maxEntryBytes); call /infer synchronously or "
    "send fewer rows"
)

_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(OIP_TO_NUMPY)},
        "parameters": {"type": "object"},
        "data": {"type": "array", "items": {}},
    },
}
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": INFER_REQUEST_SCHEMA},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: JSON header of "
                "Inference-Header-Content-Length bytes, then the tensors",
            },
        },
    }
}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _error_parts(exc: RuntimeServeError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The one mapping of domain errors to HTTP: status, extra headers, JSON body."""
    status = _STATUS.get(type(exc), 500)
    extra = []
    if isinstance(exc, QuotaExceeded):  # Retry-After and the budget the client has left
        extra = exc.decision.headers(time.time())
    elif status == 503:
        extra.append((b"retry-after", b"1"))
    elif isinstance(exc, PayloadTooLarge):  # the rest of the body is not worth reading
        extra.append((b"connection", b"close"))
    return status, extra, orjson.dumps({"error": str(exc)})


def _internal_error() -> tuple[int, str, list[tuple[bytes, bytes]], bytes]:
    """What a client reads of a server fault: no exception text, only the id to quote."""
    rid = request_id_var.get() or "-"
    return 500, "application/json", [], orjson.dumps({"error": f"internal error (request {rid})"})


def _error_response(exc: RuntimeServeError) -> Response:
    status, extra, body = _error_parts(exc)
    headers = {k.decode(): v.decode() for k, v in extra}
    return Response(body, status, headers, media_type="application/json")


# Where FrontDoor leaves the route prefix it removed from a request's path.
ROUTE_PREFIX_SCOPE = "kubeonnx.route_prefix"
# The header naming the URL to call when an asynchronous request is answered.
CALLBACK_HEADER = "kubeonnx-callback-url"

# What the inference fast path reads of a request's headers (ASGI names them in lower case).
_READ_HEADERS = frozenset(
    {
        b"x-request-id",
        b"content-encoding",
        b"content-length",
        HEADER_LENGTH.encode(),
        b"prefer",
        CALLBACK_HEADER.encode(),
    }
)

INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/(infer|async-infer)$")

# (status, content type, extra headers, body) of an inference answer
InferAnswer = tuple[int, str, list[tuple[bytes, bytes]], bytes]

# The quota charges (decision, rows, tokens) of the request being answered, settled by `metered`
# once its status is known: kept, and written to the ledger, when it was served (2xx) or the
# model itself refused its input (400: the work was done); otherwise refunded.
# Set while answering the router's mirrored copy (it bears the mirror secret): no charge.
_mirror_copy: ContextVar[bool] = ContextVar("kubeonnx_mirror_copy", default=False)
_charges: ContextVar[list[tuple[Decision, int, int]] | None] = ContextVar(
    "kubeonnx_charges", default=None
)


def charge_stands(status: int) -> bool:
    """Whether an answer with `status` keeps the request's charge (see `_charges`)."""
    return 200 <= status < 300 or status == 400


def prefers_async(prefer: str | None) -> bool:
    """RFC 7240: `Prefer: respond-async` among the header's comma-separated preferences."""
    if not prefer:
        return False
    return any(p.split(";")[0].strip().lower() == "respond-async" for p in prefer.split(","))


# Status codes whose request counter exists before the first such answer.
COUNTED_FROM_START = (200, 500, 503)


class InferHandler:
    """Inference over HTTP, framework-free: bytes in, status and bytes out, metered."""

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: RuntimeMetrics,
        max_body: int,
        quota: Quota | None = None,
        ledger: Ledger | None = None,
        jobs: AsyncStore | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.max_body = max_body
        self.max_json = dataplane.max_json_bytes or max_body
        self.quota = quota
        self.ledger = ledger
        self.jobs = jobs
        self._submitted = metrics.async_submitted.labels(dataplane.name)
        self._submitted_bytes = metrics.async_submitted_bytes.labels(dataplane.name)
        label = dataplane.name
        self.inflight = metrics.inflight.labels(label)
        self.latency = metrics.latency.labels(label)
        self._requests = metrics.requests
        # The codes a rollout's analysis reads exist at 0 from the start: Prometheus's rate()
        # and increase() cannot count a series' first value, so a series born at its first
        # request (the first 5xx of a candidate) would go uncounted.
        self._by_code: dict[int, Any] = {
            code: metrics.requests.labels(label, str(code)) for code in COUNTED_FROM_START
        }
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubeonnx-decode")

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def count(self, status: int) -> None:
        counter = self._by_code.get(status)
        if counter is None:
            counter = self._by_code[status] = self._requests.labels(
                self.dataplane.name, str(status)
            )
        counter.inc()

    def _decode(
        self, body: bytes, encoding: str | None, header_length: int | None, limit: int
    ) -> tuple[InferRequest, bytes]:
        # A body that is all JSON inflates no further than the JSON limit: a small gzip body
        # of tens of MB of JSON is refused without being inflated, let alone parsed.
        json_bound = header_length is None and self.max_json < limit
        try:
            raw = inflate(body, encoding, self.max_json if json_bound else limit)
        except PayloadTooLarge:
            if not json_bound:
                raise
            raise PayloadTooLarge(json_limit_message(self.max_json)) from None
        return self.dataplane.decode(raw, header_length), raw

    async def __call__(
        self,
        name: str,
        version: str | None,
        headers: Mapping[str, str],
        receive: Receive,
        *,
        async_endpoint: bool = False,
        route_prefix: str = "",
    ) -> InferAnswer:
        """`async_endpoint`: the request came to .../async-infer; .../infer is answered
        asynchronously too when it prefers so (RFC 7240) and the model has a queue."""
        respond_async = async_endpoint or (
            self.jobs is not None and prefers_async(headers.get("prefer"))
        )
        return await self.metered(
            self._answer(name, version, headers, receive, respond_async, route_prefix),
            "inference",
        )

    async def metered(self, work: Awaitable[InferAnswer], what: str) -> InferAnswer:
        """Await an answer, counted in the model's metrics; a domain error becomes its status
        code, anything else a 500 that names only the request id."""
        started = time.perf_counter()
        self.inflight.inc()
        status = 500
        charges: list[tuple[Decision, int, int]] = []
        token = _charges.set(charges)
        try:
            answer = await work
            status = answer[0]
            return answer
        except RuntimeServeError as exc:
            status, extra, body = _error_parts(exc)
            if status >= 500:
                log.warning("%s refused: %s", what, exc)
            else:
                log.info("bad %s request: %s", what, exc)
            return status, "application/json", extra, body
        except Exception:
            log.exception("%s failed", what)
            return _internal_error()
        finally:
            _charges.reset(token)
            if charges:
                self._settle(charges, status)
            self.inflight.dec()
            self.latency.observe(time.perf_counter() - started)
            self.count(status)

    def _settle(self, charges: list[tuple[Decision, int, int]], status: int) -> None:
        """Write a served request's charge to the ledger, or refund one that was not (in the
        background: the answer does not wait for it)."""
        for decision, rows, tokens in charges:
            if not charge_stands(status):
                assert self.quota is not None
                self.quota.refund(decision)
            elif self.ledger is not None:
                self.ledger.record(decision.tenant, rows, request_id_var.get(), tokens)

    def identify(self, headers: Mapping[str, str]) -> str:
        """The tenant a request comes from ("" without quotas): 401 before the body is read."""
        return self.quota.identify(headers) if self.quota is not None else ""

    async def read(
        self, headers: Mapping[str, str], receive: Receive, limit: int | None = None
    ) -> bytes:
        """The whole body, refused (413) at once when its declared length is over the limit
        (`max_body` unless a lower one is given)."""
        limit = self.max_body if limit is None else limit
        declared = _int_header(headers, "content-length")
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
        return await read_body(receive, limit)

    def check_json_length(
        self, headers: Mapping[str, str], header_length: int | None, limit: int
    ) -> None:
        """413 before the body is read when its JSON is declared over the JSON limit (a body
        declared over the body's `limit` is `read`'s to refuse)."""
        length = _int_header(headers, "content-length")
        if length is not None and length > limit:
            return
        if header_length is not None:
            declared: int | None = header_length
        elif headers.get("content-encoding") in (None, "", "identity"):
            declared = length
        else:
            return  # known once inflated
        if declared is not None and declared > self.max_json:
            raise PayloadTooLarge(json_limit_message(self.max_json))

    async def charge(
        self,
        tenant: str,
        rows: Callable[[], int],
        inputs: Mapping[str, Any] | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Admit `rows` (and the tokens of `inputs`, when the policy counts tokens) against
        the tenant's quota (429 when over; 413 when the request alone is over a whole window;
        400 when the token input is missing or not an integer); the budget headers to answer
        with. Without quotas, nothing. Call it after the cheap checks and before the expensive
        work: the answer's status settles the charge (`metered`)."""
        if self.quota is None or _mirror_copy.get():
            return []
        n = rows()
        spec = self.quota.config.tokens
        tokens = count_tokens(spec, inputs) if spec is not None else 0
        decision = await self.quota.admit(tenant, n, tokens)
        charges = _charges.get()
        assert charges is not None, "charge() runs under metered(), which settles it"
        charges.append((decision, n, tokens))
        return decision.headers(time.time())

    async def _answer(
        self,
        name: str,
        version: str | None,
        headers: Mapping[str, str],
        receive: Receive,
        respond_async: bool,
        route_prefix: str,
    ) -> InferAnswer:
        dataplane, batcher, jobs = self.dataplane, self.dataplane.batcher, self.jobs
        dataplane.check_model(name, version)  # a wrong name is 404 whatever the body
        if respond_async and jobs is None:
            raise ModelNotFound(
                f"model '{name}' takes no asynchronous requests (its spec.async is not enabled)"
            )
        if not respond_async:
            dataplane.check_runs()  # the gateway: 404 before the body is read or charged
        tenant = self.identify(headers)
        header_length = _int_header(headers, HEADER_LENGTH)
        limit, which = self.max_body, ""
        if respond_async and jobs is not None:
            # Cheap checks before the body is read and charged: the callback URL, and the
            # entry limit (a body, as sent or inflated, over it is refused as it arrives).
            jobs.check_callback(headers.get(CALLBACK_HEADER))
            if jobs.max_entry_bytes < limit:
                limit, which = jobs.max_entry_bytes, ASYNC_ENTRY_LIMIT
        self.check_json_length(headers, header_length, limit)
        try:
            body = await self.read(headers, receive, limit)
            encoding = headers.get("content-encoding")
            # The body is complete: from here to the queue only decoding remains, which is
            # worth the batcher waiting for.
            if batcher is not None:
                batcher.admit()
            try:
                if encoding in (None, "", "identity") and len(body) < DECODE_INLINE_BELOW:
                    decoded, raw = self._decode(body, encoding, header_length, limit)
                else:
                    decoded, raw = await asyncio.get_running_loop().run_in_executor(
                        self._decoder, self._decode, body, encoding, header_length, limit
                    )
            finally:
                if batcher is not None:
                    batcher.withdraw()
        except PayloadTooLarge as exc:
            if not which or "--max-json-bytes" in str(exc):  # the JSON limit names itself
                raise
            raise PayloadTooLarge(f"{exc}{which}") from None
        if batcher is not None and not respond_async and batcher.depth >= batcher.max_queue:
            raise ServerBusy(
                f"the request queue is full ({batcher.max_queue} waiting); retry shortly"
            )
        # Rows are known now, before the model runs.
        extra = await self.charge(tenant, lambda: request_rows(decoded.inputs), decoded.inputs)
        if respond_async and jobs is not None:
            request_id = await jobs.submit(
                raw, header_length, tenant=tenant, callback=headers.get(CALLBACK_HEADER)
            )
            self._submitted.inc()
            self._submitted_bytes.inc(len(raw))
            location = f"{route_prefix}/v2/models/{name}/requests/{request_id}"
            extra.append((b"location", location.encode()))
            extra.append((b"preference-applied", b"respond-async"))
            body = orjson.dumps({"id": request_id, "status": "pending", "location": location})
            return 202, "application/json", extra, body
        outputs = await dataplane.infer(decoded)
        payload, out_header_length = encode_response(
            dataplane.name, dataplane.version, decoded, outputs
        )
        if out_header_length is None:
            return 200, "application/json", extra, payload
        extra.append((b"inference-header-content-length", str(out_header_length).encode()))
        return 200, "application/octet-stream", extra, payload


class PredictHandler:
    """The image endpoints: /predict (one image, the body or multipart field `file`) and
    /predict/batch (multipart fields `files`). Images are decoded and preprocessed on threads,
    then each is one request to the batcher, merged with whatever else is queued."""

    def __init__(
        self,
        infer: InferHandler,
        pipeline: ImagePipeline,
        *,
        max_images: int,
        threads: int,
        max_decode_bytes: int,
    ) -> None:
        self.infer = infer
        self.pipeline = pipeline
        self.max_images = max_images
        self.budget = DecodeBudget(max_decode_bytes)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kubeonnx-image")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _images(self, body: bytes, content_type: str, batch: bool) -> list[tuple[str, bytes]]:
        """(what to call it in an error, bytes) of each image the request carries."""
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            if batch:
                raise InvalidRequest(
                    "/predict/batch takes multipart/form-data with one field 'files' per image"
                )
            return [("the image", body)]
        parts = parse_multipart(body, content_type, self.max_images + 16)
        field = "files" if batch else "file"
        images = [
            (f"{field}[{i}]" + (f" ({p.filename!r})" if p.filename else ""), p.data)
            for i, p in enumerate(q for q in parts if q.name == field)
        ]
        if not images:
            raise InvalidRequest(f"the multipart body has no field '{field}'")
        if not batch and len(images) > 1:
            raise InvalidRequest("/predict takes one image; send several to /predict/batch")
        if len(images) > self.max_images:
            raise InvalidRequest(f"{len(images)} images in one request; at most {self.max_images}")
        return images

    async def __call__(
        self,
        name: str,
        version: str | None,
        headers: Mapping[str, str],
        receive: Receive,
        *,
        batch: bool,
    ) -> InferAnswer:
        return await self.infer.metered(
            self._answer(name, version, headers, receive, batch), "image"
        )

    async def _answer(
        self,
        name: str,
        version: str | None,
        headers: Mapping[str, str],
        receive: Receive,
        batch: bool,
    ) -> InferAnswer:
        handler, dataplane = self.infer, self.infer.dataplane
        dataplane.check_model(name, version)
        tenant = handler.identify(headers)
        body = await handler.read(headers, receive)
        images = self._images(body, headers.get("content-type", ""), batch)
        pool, pipeline = self._pool, self.pipeline
        # The cheap checks (headers only), then the quota, then the expensive decodes.
        opened = await _all_or_none(
            receive, [_on(pool, pipeline.open, data, where) for where, data in images]
        )
        for image in opened:
            self.budget.check(image)
        dataplane.check_runs()  # the gateway runs no model: 404 before the charge
        assert dataplane.batcher is not None
        # A queue place for every image before the charge: no image finds the queue full
        # after others ran (the 503 would refund the whole charge for images the model ran).
        places = dataplane.batcher.reserve(len(opened))
        try:
            extra = await handler.charge(tenant, lambda: len(opened))  # a row per image
            prepared = await _all_or_none(receive, [self._decode(image) for image in opened])
            name_in = self.pipeline.input.name
            # One image failing (or the client leaving) cancels those still queued.
            outputs = await _all_or_none(
                receive,
                [dataplane.infer(InferRequest({name_in: t}), places) for t, _ in prepared],
            )
        finally:
            dataplane.batcher.release(places)
        results = [
            self.pipeline.answer(out, size)
            for out, (_, size) in zip(outputs, prepared, strict=True)
        ]
        if batch:
            answer: dict[str, Any] = {
                "model": dataplane.name,
                "results": [{"image": i, **r} for i, r in enumerate(results)],
            }
        else:
            answer = {"model": dataplane.name, **results[0]}
        return 200, "application/json", extra, orjson.dumps(answer)

    async def _decode(self, image: OpenedImage) -> tuple[Any, tuple[int, int]]:
        """Decode within the memory budget, which is given back only when the decode has
        really ended: a cancelled wait frees it at once, a running decode when it returns."""
        budget = self.budget
        await budget.acquire(image.cost)
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(self.pipeline.decode, image)
        except BaseException:
            budget.release(image.cost)
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(budget.release, image.cost))
        return await asyncio.wrap_future(future)


def _on(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.wrap_future(pool.submit(fn, *args))


async def _all_or_none(receive: Receive, work: list[Awaitable[Any]]) -> list[Any]:
    """The results of all of `work`, in order; the first failure, or the client leaving
    (the request's next message, once its body is read, is its disconnect), cancels the
    rest: decodes not started never start."""
    tasks = [asyncio.ensure_future(w) for w in work]
    together: asyncio.Future[list[Any]] = asyncio.gather(*tasks)
    gone: asyncio.Future[Message] = asyncio.ensure_future(receive())
    try:
        while True:
            await asyncio.wait((together, gone), return_when=asyncio.FIRST_COMPLETED)
            if together.done():
                return together.result()
            if gone.result()["type"] == "http.disconnect":
                raise InvalidRequest("the client went away before the images were decoded")
            gone = asyncio.ensure_future(receive())
    finally:
        gone.cancel()
        for task in tasks:
            task.cancel()
        together.cancel()


def request_rows(inputs: Mapping[str, Any]) -> int:
    """The rows a request counts for in a quota: its inputs' largest first dimension."""
    rows = 0
    for a in inputs.values():  # a loop, not max() over a generator: on every request
        n = a.shape[0] if a.ndim else 1
        if n > rows:
            rows = n
    return rows


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"header {name} {raw!r} is not an integer") from None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it grows past `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding gzip or deflate, refusing (413) output beyond `limit` bytes
    without ever holding more than that (a small body can inflate to gigabytes)."""
    if encoding in (None, "", "identity"):
        return body
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise InvalidRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"the request body inflates to more than the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidRequest(f"request body is not valid {encoding}: it is truncated")
    if inflater.unused_data:
        raise InvalidRequest(f"request body has data after the end of its {encoding} stream")
    return out


class FrontDoor:
    """The outermost ASGI layer: request ids, the Ingress route prefix, the metrics port, and
    the inference fast path, which skips the framework's routing and dependency injection
    (on the tiny model they cost more than the model). Everything else goes to the FastAPI
    app.

    With a metrics port, `/metrics` (which names tenants and their traffic) is served there
    and only there: the Service and the Ingress carry the main port alone."""

    def __init__(
        self,
        app: ASGIApp,
        infer: InferHandler,
        route_prefix: str = "",
        metrics: Callable[[], bytes] | None = None,
        metrics_port: int | None = None,
        mirror_secret: bytes = b"",
    ) -> None:
        self.app = app
        self.mirror_secret = mirror_secret
        self.infer = infer
        self._tenant_header = infer.quota.header.encode() if infer.quota else None
        self._read = _READ_HEADERS | ({self._tenant_header} if self._tenant_header else set())
        self.prefix = route_prefix.rstrip("/")
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._metrics = metrics
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (
            self.metrics_port is not None
            and (scope.get("server") or ("", 0))[1] == self.metrics_port
        ):
            await self._metrics_only(scope, send)
            return
        if self._tenant_header is not None and _count(scope["headers"], self._tenant_header) > 1:
            # /infer would read the last and the other routes the first: neither is right.
            name = self.infer.quota.config.tenant_header if self.infer.quota else ""
            await _send_error(send, 400, f"header {name} is given more than once; send one key")
            return
        path: str = scope["path"]
        prefix_used = ""
        if self.prefix and path.startswith(self.prefix + "/"):
            path = path[len(self.prefix) :]
            prefix_used = self.prefix
            scope = {**scope, "path": path, ROUTE_PREFIX_SCOPE: prefix_used}
            scope.pop("raw_path", None)
        # One pass over the headers for the few the fast path reads (no dict of them all).
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in self._read}
        rid = headers.pop("x-request-id", None) or f"{self._id_prefix}-{next(self._ids):x}"
        token = request_id_var.set(rid)
        if self.mirror_secret:
            _mirror_copy.set(is_mirror_copy(scope["headers"], self.mirror_secret))
        try:
            match = INFER_PATH.match(path) if scope["method"] == "POST" else None
            if match is None:
                await self.app(scope, receive, _with_request_id(send, rid))
                return
            status, ctype, extra, payload = await self.infer(
                match[1],
                match[2],
                headers,
                receive,
                async_endpoint=match[3] == "async-infer",
                route_prefix=prefix_used,
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", ctype.encode()),
                        (b"content-length", str(len(payload)).encode()),
                        (b"x-request-id", rid.encode()),
                        *extra,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
        finally:
            request_id_var.reset(token)

    async def _metrics_only(self, scope: Scope, send: Send) -> None:
        """The metrics port answers /metrics and nothing else (the app then has no /metrics)."""
        if scope["path"] == "/metrics" and self._metrics is not None:
            await _send(send, 200, CONTENT_TYPE_LATEST, self._metrics())
        else:
            await _send_error(send, 404, "the metrics port serves /metrics only")


def _count(headers: list[tuple[bytes, bytes]], name: bytes) -> int:
    return [k for k, _ in headers].count(name)


async def _send(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, status: int, error: str) -> None:
    await _send(send, status, "application/json", orjson.dumps({"error": error}))


def _with_request_id(send: Send, rid: str) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
        await send(message)

    return send_with_id


def create_app(
    dataplane: DataPlane,
    metrics: RuntimeMetrics,
    *,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    route_prefix: str = "",
    max_body: int = 64 * 1024 * 1024,
    quota: Quota | None = None,
    ledger: Ledger | None = None,
    jobs: AsyncStore | None = None,
    images: ImagePipeline | None = None,
    max_images: int = 64,
    image_threads: int = 2,
    metrics_port: int | None = None,
    max_decode_bytes: int = 1024 * 1024 * 1024,
    mirror_secret: bytes = b"",
) -> FrontDoor:
    """Build the app around an injected data plane and metrics registry."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if dataplane.batcher is not None:
            dataplane.batcher.start()
        if on_startup:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown:
                await on_shutdown()
            if dataplane.batcher is not None:
                await dataplane.batcher.stop()
            handler.close()
            if predict is not None:
                predict.close()

    app = FastAPI(
        title="kubeonnx runtime",
        summary="Open Inference Protocol v2 for one ONNX model",
        version=dataplane.server_metadata()["version"],
        lifespan=lifespan,
    )

    @app.exception_handler(RuntimeServeError)
    async def _domain_error(_: Request, exc: RuntimeServeError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _json({"error": str(exc.detail)}, exc.status_code, dict(exc.headers or {}))

    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> Response:
        return _json(dataplane.server_metadata())

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> Response:
        return _json({"live": dataplane.live()})

    @app.get("/v2/health/ready", summary="Readiness (503 while draining)")
    async def ready() -> Response:
        ok = dataplane.ready()
        return _json({"ready": ok}, 200 if ok else 503)

    @app.get("/v2/models/{name}", summary="Model metadata")
    @app.get("/v2/models/{name}/versions/{version}", summary="Model metadata")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _json(dataplane.model_metadata(name, version))

    @app.get("/v2/models/{name}/ready", summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", summary="Model readiness")
    async def model_ready(name: str, version: str | None = None) -> Response:
        ok = dataplane.model_ready(name, version)
        return _json({"name": name, "ready": ok}, 200 if ok else 503)

    handler = InferHandler(dataplane, metrics, max_body, quota, ledger, jobs)

    @app.get("/v2/quota", summary="The calling tenant's limits, usage and reset times")
    async def quota_usage(request: Request) -> Response:
        if quota is None:
            return _json({"error": "no quota policy applies to this model"}, 404)
        return _json(await quota.usage(quota.identify(request.headers)))

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        # Served by FrontDoor's fast path; kept as a route so /docs describes it.
        status, ctype, extra, payload = await handler(
            name,
            version,
            request.headers,
            request.receive,
            async_endpoint=request.url.path.endswith("/async-infer"),
        )
        headers = {k.decode(): v.decode() for k, v in extra}
        return Response(payload, status, headers, media_type=ctype)

    @app.get(
        "/v2/models/{name}/requests/{request_id}",
        summary="An asynchronous request: 202 while pending, its answer once done",
    )
    @app.get(
        "/v2/models/{name}/versions/{version}/requests/{request_id}",
        summary="An asynchronous request: 202 while pending, its answer once done",
    )
    async def async_result(
        request: Request, name: str, request_id: str, version: str | None = None
    ) -> Response:
        dataplane.check_model(name, version)
        if jobs is None:
            raise ModelNotFound(f"model '{name}' takes no asynchronous requests")
        tenant = handler.identify(request.headers) if quota is not None else None
        record = await jobs.lookup(request_id, tenant)
        prefix = request.scope.get(ROUTE_PREFIX_SCOPE, "")
        location = f"{prefix}/v2/models/{name}/requests/{request_id}"
        headers = {"kubeonnx-request-status": record.status}
        if record.status == "done":
            if record.header_length is not None:
                headers[HEADER_LENGTH] = str(record.header_length)
            return Response(record.result, 200, headers, media_type=record.content_type)
        if record.status == "pending":
            headers["retry-after"] = "1"
            return _json(status_document(record, location), 202, headers)
        return _json(status_document(record, location), record.code, headers)

    app.add_api_route(
        "/v2/models/{name}/infer",
        infer,
        methods=["POST"],
        summary="Inference",
        openapi_extra=_INFER_DOC,
    )
    app.add_api_route(
        "/v2/models/{name}/async-infer",
        infer,
        methods=["POST"],
        summary="Asynchronous inference: 202 and the request's Location (spec.async)",
        openapi_extra=_INFER_DOC,
    )
    app.add_api_route(
        "/v2/models/{name}/versions/{version}/infer",
        infer,
        methods=["POST"],
        summary="Inference",
        openapi_extra=_INFER_DOC,
    )
    app.add_api_route(
        "/v2/models/{name}/versions/{version}/async-infer",
        infer,
        methods=["POST"],
        summary="Asynchronous inference: 202 and the request's Location (spec.async)",
        openapi_extra=_INFER_DOC,
    )

    predict = (
        PredictHandler(
            handler,
            images,
            max_images=max_images,
            threads=image_threads,
            max_decode_bytes=max_decode_bytes,
        )
        if images is not None
        else None
    )

    async def predict_route(
        request: Request, name: str, version: str | None, batch: bool
    ) -> Response:
        if predict is None:
            dataplane.check_model(name, version)  # a wrong name or version says so first
            raise ModelNotFound(
                f"model '{name}' has no image endpoints (its spec.processing is not set)"
            )
        status, ctype, extra, payload = await predict(
            name, version, request.headers, request.receive, batch=batch
        )
        headers = {k.decode(): v.decode() for k, v in extra}
        return Response(payload, status, headers, media_type=ctype)

    @app.post(
        "/v2/models/{name}/predict",
        summary="Classify or detect in one image (the body, or multipart field 'file')",
    )
    @app.post(
        "/v2/models/{name}/versions/{version}/predict",
        summary="Classify or detect in one image (the body, or multipart field 'file')",
    )
    async def predict_one(request: Request, name: str, version: str | None = None) -> Response:
        return await predict_route(request, name, version, batch=False)

    @app.post(
        "/v2/models/{name}/predict/batch",
        summary="Classify or detect in several images (multipart fields 'files'), batched",
    )
    @app.post(
        "/v2/models/{name}/versions/{version}/predict/batch",
        summary="Classify or detect in several images (multipart fields 'files'), batched",
    )
    async def predict_batch(request: Request, name: str, version: str | None = None) -> Response:
        return await predict_route(request, name, version, batch=True)

    def exposition() -> bytes:
        return generate_latest(metrics.registry)

    if metrics_port is None:  # else served on that port alone (FrontDoor)

        @app.get("/metrics", summary="Prometheus metrics")
        async def prometheus() -> Response:
            return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    return FrontDoor(app, handler, route_prefix, exposition, metrics_port, mirror_secret)
