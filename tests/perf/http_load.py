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
    this client does not frame."""


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
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(HttpLoadError(f"connection lost: {exc or 'closed by peer'}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        length, problem = 0, None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                problem = "answers without Content-Length (Transfer-Encoding) are not supported"
            elif name == b"connection" and value.strip().lower() == b"close":
                self.close_after = True
        waiting, self.waiting = self.waiting, None
        if waiting is None or waiting.done():  # an answer nobody asked for: drop the connection
            self.close()
            return
        parts = lines[0].split(None, 2)
        if problem is None and (len(parts) < 2 or not parts[1].isdigit()):
            problem = f"not an HTTP status line: {lines[0][:80]!r}"
        if problem is not None:
            waiting.set_exception(HttpLoadError(problem))
            self.close()
            return
        if len(self.buffer) < end + 4 + length:
            self.waiting = waiting  # the body is still coming
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        waiting.set_result(Answer(int(parts[1]), body))
        if self.close_after:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LoadClient:
    """`connections` keep-alive connections to `host:port`; a request waits for a free one."""

    def __init__(self, host: str, port: int, connections: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.size, self.timeout = host, port, connections, timeout
        self.idle: list[_Connection] = []
        self.opened = 0
        self.queue: collections.deque[asyncio.Future[None]] = collections.deque()

    async def _take(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            while self.idle:
                connection = self.idle.pop()
                if not connection.closed:
                    return connection
                self.opened -= 1
            if self.opened < self.size:
                self.opened += 1
                try:
                    _, connection = await loop.create_connection(_Connection, self.host, self.port)
                except OSError as exc:
                    self.opened -= 1
                    self._wake()
                    where = f"{self.host}:{self.port}"
                    raise HttpLoadError(f"cannot connect to {where}: {exc}") from exc
                return connection
            turn = loop.create_future()
            self.queue.append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._wake()  # pass the turn on
                raise

    def _give(self, connection: _Connection) -> None:
        if connection.closed:
            self.opened -= 1
        else:
            self.idle.append(connection)
        self._wake()

    def _wake(self) -> None:
        while self.queue:
            turn = self.queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        connection = await self._take()
        try:
            head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            head += f"content-length: {len(body)}\r\n"
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
                connection.close()  # an answer may still come: never reuse the connection
                raise HttpLoadError(f"no answer within {self.timeout} s") from exc
        except BaseException:
            if connection.waiting is not None:  # left mid-request (cancelled): not reusable
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
        for connection in self.idle:
            connection.close()
        self.idle.clear()
