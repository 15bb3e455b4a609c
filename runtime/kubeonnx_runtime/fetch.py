"""Model fetch at start-up: s3:// (boto3, parallel ranged parts) and file://, verified.

A download is hashed while it streams, written to a `.part` file and renamed into the cache
only when complete and, if a sha256 was given, matching it. Every part is fetched from the
object version that HEAD saw (If-Match on its ETag, and its VersionId where the bucket has
versions): an object overwritten mid-download starts the download over, never mixes two
versions. A cached file is hashed again before it is reused (a copy changed on disk is
fetched again). Nothing half-downloaded, mixed or mismatched is ever returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import FatalStartupError

log = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024
PARALLEL_PARTS = 8
PROGRESS_EVERY_S = 5.0
RETRIES = 5  # per S3 call (botocore) and per part whose stream breaks (here)
RESTARTS = 3  # whole downloads, when the object changes while it is being fetched
# S3 error codes after which retrying cannot help.
_FATAL_S3_CODES = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such key",
    "404": "no such key",
    "NotFound": "no such key",
    "AccessDenied": "access denied",
    "403": "access denied",
    "Forbidden": "access denied",
    "InvalidAccessKeyId": "access denied (unknown access key id)",
    "SignatureDoesNotMatch": "access denied (wrong secret access key)",
    "InvalidBucketName": "invalid bucket name",
}


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str | None = None


class ObjectChanged(Exception):
    """The object was overwritten while its parts were being fetched."""


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    sha256: str
    size: int
    downloaded_bytes: int  # 0 when the cache or a local file served it
    seconds: float


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(uri: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected.lower():
        raise FatalStartupError(
            f"checksum mismatch for {uri}: sha256 is {actual}, spec.model.sha256 expects "
            f"{expected.lower()}"
        )


def _cache_error(cache_dir: Path, exc: OSError) -> FatalStartupError:
    return FatalStartupError(f"cannot use the model cache {cache_dir}: {exc.strerror or exc}")


def fetch_model(
    uri: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    s3: S3Options | None = None,
) -> FetchedModel:
    """Return a verified local copy of the model at `uri`, or raise FatalStartupError."""
    started = time.monotonic()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.netloc + parsed.path))
        if not path.is_file():
            raise FatalStartupError(f"model file not found: {path}")
        digest = _hash_file(path)
        _check_digest(uri, digest, sha256)
        return FetchedModel(path, digest, path.stat().st_size, 0, time.monotonic() - started)
    if parsed.scheme == "s3":
        if not parsed.netloc or not parsed.path.strip("/"):
            raise FatalStartupError(f"model uri {uri} must be s3://BUCKET/KEY")
        return _fetch_s3(
            uri,
            parsed.netloc,
            parsed.path.lstrip("/"),
            cache_dir,
            sha256,
            s3 or S3Options(),
            started,
        )
    raise FatalStartupError(
        f"unsupported model uri scheme {parsed.scheme or '(none)'!r} in {uri}; use s3:// or file://"
    )


def _s3_client(options: S3Options) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": RETRIES, "mode": "standard"},
        max_pool_connections=PARALLEL_PARTS + 2,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client(
        "s3",
        endpoint_url=options.endpoint or None,
        region_name=options.region or None,
        config=config,
    )


def _code(exc: Any) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "403", ...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _s3_error(uri: str, exc: Exception) -> FatalStartupError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = _code(exc)
        what = _FATAL_S3_CODES.get(code, f"S3 error {code}")
        return FatalStartupError(f"cannot fetch {uri}: {what}")
    if isinstance(exc, NoCredentialsError):
        return FatalStartupError(
            f"cannot fetch {uri}: no S3 credentials (set a credentials Secret or pod identity)"
        )
    if isinstance(exc, EndpointConnectionError):
        return FatalStartupError(f"cannot fetch {uri}: S3 endpoint unreachable ({exc})")
    return FatalStartupError(f"cannot fetch {uri}: {type(exc).__name__}: {exc}")


def _fetch_s3(
    uri: str,
    bucket: str,
    key: str,
    cache_dir: Path,
    sha256: str | None,
    options: S3Options,
    started: float,
) -> FetchedModel:

    client = _s3_client(options)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_error(cache_dir, exc) from None
    for attempt in range(1, RESTARTS + 1):
        head = _head(client, uri, bucket, key)
        try:
            return _fetch_version(client, uri, bucket, key, head, cache_dir, sha256, started)
        except ObjectChanged:
            log.warning(
                "model object changed during download; starting over",
                extra={"uri": uri, "attempt": attempt},
            )
    raise FatalStartupError(
        f"cannot fetch {uri}: the object changed during each of {RESTARTS} downloads"
    )


def _head(client: Any, uri: str, bucket: str, key: str) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head: dict[str, Any] = client.head_object(Bucket=bucket, Key=key)
        return head
    except ClientError as exc:
        if _code(exc) in {"404", "NoSuchKey", "NotFound"}:
            # HEAD cannot tell a missing bucket from a missing key; ask the bucket.
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError as bucket_exc:
                if _code(bucket_exc) in {"404", "NoSuchBucket", "NotFound"}:
                    raise FatalStartupError(f"cannot fetch {uri}: no such bucket") from None
                raise _s3_error(uri, bucket_exc) from None
            except BotoCoreError as bucket_exc:
                raise _s3_error(uri, bucket_exc) from None
        raise _s3_error(uri, exc) from None
    except BotoCoreError as exc:
        raise _s3_error(uri, exc) from None


def _fetch_version(
    client: Any,
    uri: str,
    bucket: str,
    key: str,
    head: dict[str, Any],
    cache_dir: Path,
    sha256: str | None,
    started: float,
) -> FetchedModel:
    from botocore.exceptions import BotoCoreError, ClientError

    size = int(head["ContentLength"])
    etag = str(head.get("ETag", ""))
    log.debug("model object", extra={"uri": uri, "bytes": size, "etag": etag})
    # The cache key names the object version; the digest file records what was verified.
    ident = hashlib.sha256(f"{uri}\0{etag.strip(chr(34))}\0{size}".encode()).hexdigest()[:32]
    final = cache_dir / f"{ident}.onnx"
    digest_file = cache_dir / f"{ident}.sha256"
    if final.is_file() and digest_file.is_file() and final.stat().st_size == size:
        recorded = digest_file.read_text().strip()
        if not sha256 or recorded == sha256.lower():
            # The bytes, not the note beside them: hashing costs little next to loading.
            actual = _hash_file(final)
            if actual == recorded:
                log.info("model cache hit", extra={"uri": uri, "path": str(final)})
                return FetchedModel(final, actual, size, 0, time.monotonic() - started)
            log.warning(
                "cached model does not match its recorded sha256; fetching it again",
                extra={"uri": uri, "path": str(final), "sha256": actual, "recorded": recorded},
            )
            digest_file.unlink(missing_ok=True)

    version = {"IfMatch": etag} if etag else {}
    if head.get("VersionId"):
        version["VersionId"] = str(head["VersionId"])
    part = cache_dir / f"{ident}.part"
    try:
        digest = _download(client, bucket, key, size, part, uri, version)
    except ClientError as exc:
        part.unlink(missing_ok=True)
        if _code(exc) in {"412", "PreconditionFailed"}:
            raise ObjectChanged() from None
        raise _s3_error(uri, exc) from None
    except BotoCoreError as exc:
        part.unlink(missing_ok=True)
        raise _s3_error(uri, exc) from None
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise FatalStartupError(
            f"cannot write {uri} ({size} bytes) to the model cache {cache_dir}: "
            f"{exc.strerror or exc}"
        ) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    try:
        _check_digest(uri, digest, sha256)
    except FatalStartupError:
        part.unlink(missing_ok=True)
        raise
    try:
        os.replace(part, final)
        digest_file.write_text(digest + "\n")
    except OSError as exc:
        raise _cache_error(cache_dir, exc) from None
    return FetchedModel(final, digest, size, size, time.monotonic() - started)


def _download(
    client: Any, bucket: str, key: str, size: int, dest: Path, uri: str, version: dict[str, str]
) -> str:
    """Fetch parts of one object version in parallel, write them in place, hash them in
    order as they arrive."""
    from botocore.exceptions import BotoCoreError

    digest = hashlib.sha256()
    ranges = [(o, min(o + PART_SIZE, size) - 1) for o in range(0, size, PART_SIZE)]

    def get(byte_range: tuple[int, int]) -> bytes:
        start, end = byte_range
        # botocore retries failed calls; a stream that breaks mid-body is retried here.
        for attempt in range(1, RETRIES + 1):
            try:
                resp = client.get_object(
                    Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", **version
                )
                data: bytes = resp["Body"].read()
                if len(data) == end - start + 1:
                    return data
                problem = f"short read at byte {start} ({len(data)} of {end - start + 1})"
            except BotoCoreError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < RETRIES:
                delay = min(0.5 * 2 ** (attempt - 1), 8.0)
                log.warning("part at byte %d failed (%s); retrying in %.1fs", start, problem, delay)
                time.sleep(delay)
        raise FatalStartupError(f"cannot fetch {uri}: {problem} after {RETRIES} attempts")

    progress = _Progress(uri, size)
    with dest.open("wb") as out, ThreadPoolExecutor(PARALLEL_PARTS) as pool:
        if size == 0:
            return digest.hexdigest()
        # A window of 2x the workers bounds memory while keeping every worker busy.
        window = 2 * PARALLEL_PARTS
        futures: dict[int, Future[bytes]] = {}
        for i, r in enumerate(ranges[:window]):
            futures[i] = pool.submit(get, r)
        for i, (start, _end) in enumerate(ranges):
            data = futures.pop(i).result()
            nxt = i + window
            if nxt < len(ranges):
                futures[nxt] = pool.submit(get, ranges[nxt])
            out.seek(start)
            out.write(data)
            digest.update(data)
            progress.advance(len(data))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


class _Progress:
    def __init__(self, uri: str, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.uri, self.size, self.clock = uri, size, clock
        self.done = 0
        self.started = self.last = clock()

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= PROGRESS_EVERY_S or self.done == self.size:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            log.info(
                "model download %.0f%% (%d of %d bytes, %.1f MB/s)",
                100 * self.done / max(self.size, 1),
                self.done,
                self.size,
                rate / 1e6,
                extra={"uri": self.uri},
            )
