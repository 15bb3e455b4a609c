"""The router's HTTP/1.1 client: keep-alive connections to the versions' upstreams on the
event loop's own transports, answers parsed by httptools.

Each upstream (a plain http://HOST:PORT) has a stack of idle connections, taken and given
back in constant time. An idle connection that the upstream closes is dropped at once (its
end of file reaches the protocol), and one idle longer than `IDLE_S` is not reused, so a
request is not written to a connection the upstream is about to close (uvicorn closes one
after 5 s idle). A connection is reused only after a whole answer that allows it.

Failures say how far the exchange got, which decides what the router may do next:
`ConnectFailed` (nothing sent: any request may go elsewhere), `UpstreamTimeout`,
`UpstreamClosed` (the connection dropped, the answer was not HTTP or its head was over
`MAX_HEAD` bytes, the limit the server puts on a client's), `ClientGone` (the
client left before its body was read whole; the upstream connection is closed, as the
request on it is incomplete).

An upstream may answer before it has taken the whole request body (a 413) and reset the
connection. The router's next write of the body then fails, and the event loop closes the
socket at once, maybe before it has read the answer already waiting in it. So while a
request with a body is on, the connection holds a duplicate of its socket, and what the
kernel still holds is read from it when the connection ends: an answer whose head arrived
is relayed, whatever became of the rest of the request.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools

IDLE_S = 4.0  # below uvicorn's 5 s keep-alive: never race the upstream's own close
HIGH_WATER = 256 * 1024  # answer bytes buffered before the upstream is told to wait
MAX_IDLE = 512  # idle connections kept per upstream
MAX_HEAD = 64 * 1024  # an answer's status line and headers (1xx heads included), as clients'


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """No connection: nothing of the request reached the upstream."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamClosed(UpstreamError):
    """The connection dropped, or what came back was not an HTTP/1.1 answer."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered  # any byte of an answer arrived


class _HeadTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected before its request body was read whole."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.fd = -1
        self.idle_since = 0.0
        self.reusable = False
        self._busy = False  # an exchange is on
        self._answered = False  # a byte of the answer arrived
        self._informational = False  # the answer being parsed is a 1xx, to skip
        self._head_only = False  # a HEAD request's answer: no body
        self._until_close = False  # the answer's body ends when the connection does
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self._buffered = 0
        self._head_bytes = 0  # received while the answer's head was incomplete
        self._paused = False
        self.complete = False
        self._spare: socket.socket | None = None  # a duplicate while a body is sent
        self._lost: asyncio.Future[None] = loop.create_future()  # connection_lost came

    # -- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        if sock is not None:
            # The head and a streamed body are separate writes: without NODELAY, Nagle
            # holds the body until the upstream's delayed ACK of the head.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            self.close()  # bytes nobody asked for: the connection is not usable
            return
        self._answered = True
        in_head = not self.status
        if in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):  # raised by on_headers_complete
                self._head_too_large()
            else:
                self._fail(UpstreamClosed(f"not an HTTP/1.1 answer: {exc}", answered=True))
                self.close()
            return
        if not self.status and self._head_bytes > MAX_HEAD:
            self._head_too_large()  # not whole yet, and over the limit already

    def _head_too_large(self) -> None:
        self._fail(UpstreamClosed(f"the answer's head is over {MAX_HEAD} bytes", answered=True))
        self.close()

    def eof_received(self) -> bool:
        if self._busy and self._until_close and self.status:
            self.complete, self.reusable = True, False  # an answer delimited by the close
            self._wake()
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._busy and not self.complete and self._spare is not None:
            self._read_spare()
        self._close_spare()
        if not self._lost.done():
            self._lost.set_result(None)
        if self._busy and not self.complete:
            self._fail(UpstreamClosed("the connection dropped", answered=self._answered))
        self._wake_drain()

    def _read_spare(self) -> None:
        """What arrived before the connection ended and the event loop did not read (a
        failed write closed the socket first): an answer given before the whole body."""
        assert self._spare is not None
        try:
            while self._busy and self._error is None and not self.complete:
                data = self._spare.recv(65536, socket.MSG_DONTWAIT)
                if not data:
                    return
                self.data_received(data)
        except OSError:  # nothing more (EAGAIN), or the reset itself
            return

    def _close_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()

    def pause_writing(self) -> None:
        self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_drain()

    # -- parser callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.status:  # after the head: a trailer field, ignored (RFC 9110 6.5.1)
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # What arrived while reading the head bounds its size from above; only an answer
        # that may be over the limit pays for measuring it.
        if self._head_bytes > MAX_HEAD and self._head_size() > MAX_HEAD:
            raise _HeadTooLarge()
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: not the answer
            self._informational = True
            self.headers = []
            return
        self.status = status
        self.reusable = self.parser.should_keep_alive()
        # An answer whose body ends with the connection never allows another on it.
        names = set() if self.reusable else {k.lower() for k, _ in self.headers}
        self._until_close = (
            not self.reusable
            and b"content-length" not in names
            and b"transfer-encoding" not in names
            and status not in (204, 304)
            and not self._head_only
        )
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def _head_size(self) -> int:
        return 16 + sum(len(k) + len(v) + 4 for k, v in self.headers)  # 16: the status line

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and not self.closed:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        self._wake()

    # -- the exchange ----------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        return self._answered

    def begin(self, head_only: bool, with_body: bool = False) -> None:
        """A new exchange; `with_body`: its request has a body, which the upstream may
        refuse and then reset the connection under its answer."""
        if with_body and self.fd >= 0 and not self.closed:
            self._spare = socket.socket(fileno=os.dup(self.fd))
        self._busy, self._answered, self.complete = True, False, False
        self._head_only = head_only
        self._head = self.loop.create_future()
        self._error = None
        self.status, self.headers = 0, []
        self._buffered = self._head_bytes = 0

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamClosed("the connection dropped", answered=self._answered)
        self.transport.write(data)

    async def drain(self, wait_s: float) -> None:
        if self._drain is not None and not self.closed:
            await self._wait(self._drain, wait_s, "sending the request")
        if self.closed and not self.complete:
            raise self._error or UpstreamClosed("the connection dropped", self._answered)

    async def read_head(self, wait_s: float) -> None:
        assert self._head is not None
        if not self._head.done():
            await self._wait(self._head, wait_s, "waiting for the answer")
        if self._error is not None and not self.status:
            raise self._error
        if self._head_only:  # HEAD: the answer has no body, whatever its length says
            self.complete, self.reusable = True, False

    async def settle(self, wait_s: float) -> None:
        """The connection closed, and what arrived before its end parsed: after a failure,
        whether an answer came is known only then."""
        self.close()
        if not self._lost.done():
            await self._wait(self._lost, wait_s, "closing the connection")

    async def read_chunk(self, wait_s: float) -> bytes:
        """The next part of the answer's body, b"" once it is whole."""
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= HIGH_WATER // 4:
                    self._paused = False
                    if self.transport is not None and not self.closed:
                        self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self.loop.create_future()
            await self._wait(self._waiter, wait_s, "reading the answer")

    def finish(self) -> bool:
        """The exchange is over; whether the connection can take another."""
        self._busy = False
        self._head = self._waiter = None
        self._close_spare()
        ok = self.complete and self.reusable and not self.closed and not self.chunks
        if not ok:
            self.close()
        return ok

    def quiet(self) -> bool:
        """Nothing waits to be read on the idle connection: not even its end, which the
        event loop may not have handed over yet (the upstream closed it just now)."""
        if self.fd < 0:
            return True
        poll = select.poll()  # not select(): descriptors above 1023 are common in a proxy
        poll.register(self.fd, select.POLLIN)
        return not poll.poll(0)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    # -- helpers ---------------------------------------------------------------------------

    async def _wait(self, future: asyncio.Future[None], wait_s: float, doing: str) -> None:
        timer = self.loop.call_later(wait_s, _expire, future)
        try:
            await future
        except UpstreamTimeout:
            self.close()
            raise UpstreamTimeout(f"no progress in {wait_s:g} s {doing}") from None
        finally:
            timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        for future in (self._head, self._waiter):
            if future is not None and not future.done():
                future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(UpstreamTimeout())


class Pool:
    """Idle connections per upstream (host, port)."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[Connection]] = {}

    async def acquire(self, host: str, port: int, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection (a new one if `fresh`), and whether it was reused (an idle one)."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get((host, port))
        if idle and not fresh:
            now = loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < IDLE_S and conn.quiet():
                    return conn, True
                conn.close()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(loop), host, port),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            raise ConnectFailed(f"cannot connect to {host}:{port}: {reason}") from None
        return conn, False

    def release(self, host: str, port: int, conn: Connection) -> None:
        if conn.finish():
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < MAX_IDLE:
                conn.idle_since = conn.loop.time()
                idle.append(conn)
                return
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def request_head(
    method: str, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]], framing: bytes
) -> bytes:
    """The request line and headers, `framing` being the body's length header (if any)."""
    lines = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for k, v in headers:
        lines += (k, b": ", v, b"\r\n")
    if framing:
        lines += (framing, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


async def send_body(
    conn: Connection, body: AsyncIterator[bytes], chunked: bool, wait_s: float
) -> None:
    """Stream a request body upstream (chunked transfer coding when its length is unknown)."""
    async for part in body:
        conn.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
        await conn.drain(wait_s)
    if chunked:
        conn.write(b"0\r\n\r\n")
