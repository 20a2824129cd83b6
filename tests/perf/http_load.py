"""A lean HTTP/1.1 client for driving load: a pool of keep-alive connections, one request in
flight on each, answers framed by Content-Length.

The end-to-end bench's CRUD baseline is driven over HTTP from the same 2-core machine it runs on,
so what the client spends is taken from the service it drives. httpx spent about 1 ms of CPU a
request there (0.81 cores at 828 requests/s, the baseline itself using 0.57) and held the
baseline to that rate; this client drove the same baseline to 1,380-1,462 requests/s at 0.22
cores, about what the partners' Kafka producer spends on the other side of the comparison."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass


class HttpLoadError(Exception):
    """The request got no complete answer: connection refused or lost, timeout, or an answer
    this client does not frame (chunked, without Content-Length, interim 1xx)."""


@dataclass(frozen=True)
class Answer:
    status_code: int
    content: bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting: asyncio.Future[Answer] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"connection lost: {exc or 'closed by peer'}")

    def data_received(self, data: bytes) -> None:
        if self.waiting is None or self.waiting.done():  # nobody asked: drop the connection
            self.close()
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            self._fail(f"not an HTTP status line: {lines[0][:80]!r}")
            return
        status = int(parts[1])
        if status < 200:  # interim answers come only when asked for (Expect): never here
            self._fail(f"an interim answer ({status}) is not supported")
            return
        length: int | None = 0 if status in (204, 304) else None
        close_after = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name in (b"content-length", b"transfer-encoding"):
                self._fail(f"answers framed by {line[:80]!r} are not supported")
                return
            elif name == b"connection" and value.lower() == b"close":
                close_after = True
        if length is None:
            self._fail(f"an answer with status {status} and no Content-Length")
            return
        if len(self.buffer) < end + 4 + length:
            return  # the body is still coming
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        waiting, self.waiting = self.waiting, None
        waiting.set_result(Answer(status, body))
        if close_after or self.buffer:  # bytes past the answer: nothing here can be trusted
            self.close()

    def _fail(self, problem: str) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(HttpLoadError(problem))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LoadClient:
    """`connections` keep-alive connections to `host:port`; a request waits for a free one, in
    the order they asked."""

    def __init__(self, host: str, port: int, connections: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.size, self.timeout = host, port, connections, timeout
        self._host_line = f"host: {host}:{port}\r\n"  # the same in every request
        self.idle: list[_Connection] = []
        self.every: set[_Connection] = set()  # open or opening, idle or not
        self.opened = 0
        # Waiting requests: each is handed a free connection, or None to open one itself.
        self.queue: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()

    async def _take(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while self.queue and self.queue[0].done():  # turns given up
            self.queue.popleft()
        if self.queue or (not self.idle and self.opened >= self.size):
            turn: asyncio.Future[_Connection | None] = loop.create_future()
            self.queue.append(turn)
            try:
                handed = await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed something: pass it on
                    if turn.result() is None:
                        self.opened -= 1
                    self._give(turn.result())
                raise
            if handed is not None:
                return handed
            # Handed a slot, already counted in `opened`: open a connection in it.
        else:
            while self.idle:
                connection = self.idle.pop()
                if not connection.closed:
                    return connection
                self._forget(connection)
            self.opened += 1
        try:
            _, connection = await loop.create_connection(_Connection, self.host, self.port)
        except BaseException as exc:
            self.opened -= 1
            self._give(None)  # the slot, to the next in line
            if isinstance(exc, OSError):
                where = f"{self.host}:{self.port}"
                raise HttpLoadError(f"cannot connect to {where}: {exc}") from exc
            raise
        self.every.add(connection)
        return connection

    def _give(self, connection: _Connection | None) -> None:
        """A connection done with, or None for a slot freed, to the first request waiting (a slot
        is counted in `opened` as it is handed)."""
        if connection is not None and connection.closed:
            self._forget(connection)
            connection = None
        while self.queue:
            turn = self.queue.popleft()
            if not turn.done():
                if connection is None:
                    self.opened += 1
                turn.set_result(connection)
                return
        if connection is not None:
            self.idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        if connection in self.every:
            self.every.discard(connection)
            self.opened -= 1

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        connection = await self._take()
        try:
            head = f"{method} {path} HTTP/1.1\r\n{self._host_line}content-length: {len(body)}\r\n"
            for name, value in (headers or {}).items():
                head += f"{name}: {value}\r\n"
            connection.waiting = asyncio.get_running_loop().create_future()
            if connection.closed or connection.transport is None:
                raise HttpLoadError("connection closed before the request went out")
            connection.transport.write(head.encode() + b"\r\n" + body)
            try:
                async with asyncio.timeout(self.timeout):
                    return await connection.waiting
            except TimeoutError as exc:
                raise HttpLoadError(f"no answer within {self.timeout} s") from exc
        except BaseException:
            if connection.waiting is not None:  # left mid-request: an answer may still come
                connection.close()
            raise
        finally:
            self._give(connection)

    async def get(self, path: str) -> Answer:
        return await self.request("GET", path)

    async def post(
        self, path: str, content: bytes, headers: dict[str, str] | None = None
    ) -> Answer:
        return await self.request("POST", path, content, headers)

    async def aclose(self) -> None:
        for connection in list(self.every):
            connection.close()
            self._forget(connection)
        self.idle.clear()
