"""Domain errors of the runtime; the HTTP layer maps each to one status code."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class RuntimeServeError(Exception):
    """Base class: the message is what the client (or the operator) reads."""


class InvalidRequest(RuntimeServeError):
    """The request is malformed or does not fit the model (HTTP 400)."""


class ModelNotFound(RuntimeServeError):
    """No model by that name or version is served here (HTTP 404)."""


class ServerBusy(RuntimeServeError):
    """The batching queue is full (HTTP 503 with Retry-After)."""


class FatalStartupError(Exception):
    """Start-up cannot succeed: the message is written to the termination log as one line."""


def write_termination_message(path: str | Path, message: str) -> None:
    """One line for `kubectl describe` and the operator's status; never fails the caller."""
    line = " ".join(message.split())[:4000]
    try:
        Path(path).write_text(line + "\n")
    except OSError as exc:
        log.warning("cannot write termination message to %s: %s", path, exc)
