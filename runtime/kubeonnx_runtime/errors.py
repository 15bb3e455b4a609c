"""Domain errors of the runtime; the HTTP layer maps each to one status code."""

from __future__ import annotations


class RuntimeServeError(Exception):
    """Base class: the message is what the client (or the operator) reads."""


class InvalidRequest(RuntimeServeError):
    """The request is malformed or does not fit the model (HTTP 400)."""


class ModelNotFound(RuntimeServeError):
    """No model by that name or version is served here (HTTP 404)."""


class ServerBusy(RuntimeServeError):
    """The batching queue is full (HTTP 503 with Retry-After)."""


class NotReady(RuntimeServeError):
    """The model is not loaded yet, or the server is draining (HTTP 503)."""


class FatalStartupError(Exception):
    """Start-up cannot succeed: the message is written to the termination log as one line."""
