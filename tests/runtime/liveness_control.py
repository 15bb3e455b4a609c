"""The liveness probe's control: a trivial HTTP server, in its own process, that answers
every request 200 at once. It runs on the same event loop and HTTP parser as the runtime
(uvloop, httptools), so a machine that starves processes delays its answers as much as the
runtime's; what the runtime's answers take beyond the control's is the runtime's own doing.

Usage: python liveness_control.py PORT"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

Message = MutableMapping[str, Any]
BODY = b'{"live":true}'


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
