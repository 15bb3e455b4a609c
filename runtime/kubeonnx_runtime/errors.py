"""Domain errors of the runtime; the HTTP layer maps each to one status code."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import ValidationError

log = logging.getLogger(__name__)

# scheme://user:password@host -> scheme://user:***@host (an S3 endpoint may carry them)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")


def redact(text: str) -> str:
    """The text with the password of any URL in it replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def describe(exc: ValidationError) -> str:
    """Every problem pydantic found, each as `field.path: message`, in one line."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
    )


class RuntimeServeError(Exception):
    """Base class: the message is what the client (or the operator) reads."""


class InvalidRequest(RuntimeServeError):
    """The request is malformed or does not fit the model (HTTP 400)."""


class ModelNotFound(RuntimeServeError):
    """No model by that name or version is served here (HTTP 404)."""


class PayloadTooLarge(RuntimeServeError):
    """The request body, as sent or once inflated, is over the size limit (HTTP 413)."""


class ServerBusy(RuntimeServeError):
    """The batching queue is full (HTTP 503 with Retry-After)."""


class FatalStartupError(Exception):
    """Start-up cannot succeed: the message is written to the termination log as one line."""


def write_termination_message(path: str | Path | None, message: str) -> None:
    """One line for `kubectl describe` and the operator's status; never fails the caller.
    No path (a runtime started by hand): nothing is written."""
    if path is None:
        return
    line = redact(" ".join(message.split()))[:4000]
    try:
        Path(path).write_text(line + "\n")
    except OSError as exc:
        log.warning("cannot write termination message to %s: %s", path, exc)
