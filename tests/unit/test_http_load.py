"""The bench's lean HTTP client (tests/perf/http_load.py) against real servers on loopback: a
plain asyncio server for the framing and failure cases, and uvicorn serving a FastAPI app for the
stack the CRUD baseline runs on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from fastapi import FastAPI, Request, Response

from shared.devstack import free_port
from tests.perf.http_load import HttpLoadError, LoadClient
from tests.support import served

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on a free port; yields the port and the list of connections it accepted."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head.split(b"\r\n")[0], await reader.readexactly(length)


async def test_answers_split_across_packets_and_keep_alive_reuse_one_connection() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            answer = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (
                len(line + body), line + body)  # fmt: skip
            for i in range(0, len(answer), 7):  # in pieces, to be put together by the client
                writer.write(answer[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0)

    async with serving(echo) as (port, accepted):
        client = LoadClient("127.0.0.1", port, connections=1)
        first = await client.post("/leads", b'{"n": 1}', {"content-type": "application/json"})
        second = await client.get("/healthz")
        await client.aclose()
    assert (first.status_code, first.content) == (201, b'POST /leads HTTP/1.1{"n": 1}')
    assert (second.status_code, second.content) == (201, b"GET /healthz HTTP/1.1")
    assert len(accepted) == 1


async def test_no_more_connections_than_asked_and_every_request_answered() -> None:
    in_flight, most = 0, 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with serving(slow) as (port, accepted):
        client = LoadClient("127.0.0.1", port, connections=3)
        answers = await asyncio.gather(*(client.get(f"/{n}") for n in range(30)))
        await client.aclose()
    assert [a.content for a in answers] == [b"ok"] * 30
    assert len(accepted) == 3
    assert most == 3


async def test_refused_and_timed_out_requests_are_errors() -> None:
    client = LoadClient("127.0.0.1", free_port(), connections=2)  # nothing listens there
    with pytest.raises(HttpLoadError, match="cannot connect"):
        await client.get("/")
    assert client.opened == 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(1)

    async with serving(silent) as (port, _):
        client = LoadClient("127.0.0.1", port, connections=1, timeout=0.1)
        with pytest.raises(HttpLoadError, match="no answer within"):
            await client.get("/")
        assert client.opened == 0  # the late answer can't reach the next request
        await client.aclose()


async def test_against_uvicorn_and_fastapi() -> None:
    app = FastAPI()

    @app.post("/leads", status_code=201)
    async def leads(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/empty")
    async def empty() -> Response:
        return Response(status_code=204)

    async with served(app, log_level="error") as port:
        client = LoadClient("127.0.0.1", port, connections=4)
        posted = await asyncio.gather(
            *(client.post("/leads", b"x" * n, {"content-type": "application/json"})
              for n in range(50))
        )  # fmt: skip
        empty_answer = await client.get("/empty")
        missing = await client.get("/nowhere")
        await client.aclose()
    assert [(a.status_code, a.content) for a in posted] == [
        (201, b'{"bytes":%d}' % n) for n in range(50)
    ]
    assert (empty_answer.status_code, empty_answer.content) == (204, b"")
    assert missing.status_code == 404 and b"Not Found" in missing.content


async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request with its path; `/hang` gets no answer, `/drop` the connection
    closed instead, `/close` its answer and then the connection closed, `/extra` an answer with
    bytes after it, `/chunked` a chunked one, `/unframed` one without Content-Length,
    `/negative` a length below zero, `/interim` a 100 before it."""
    while True:
        try:
            line, _ = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        path = line.split()[1]
        if path == b"/hang":
            continue
        if path == b"/drop":
            return
        if path == b"/chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            )
        elif path == b"/unframed":
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nbody")
        elif path == b"/negative":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n")
        elif path == b"/interim":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        else:
            close = b"Connection: close\r\n" if path == b"/close" else b""
            answer = b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (
                close, len(path), path)  # fmt: skip
            writer.write(answer + (b"HTTP/1.1 500 STALE\r\n" if path == b"/extra" else b""))
        await writer.drain()
        if path == b"/close":
            return


async def test_failures_and_answers_it_cannot_frame_are_errors_and_the_pool_recovers() -> None:
    async with serving(answering) as (port, accepted):
        client = LoadClient("127.0.0.1", port, connections=1)
        with pytest.raises(HttpLoadError, match="connection lost"):
            await client.get("/drop")
        with pytest.raises(HttpLoadError, match="Transfer-Encoding"):
            await client.get("/chunked")
        with pytest.raises(HttpLoadError, match="no Content-Length"):
            await client.get("/unframed")
        with pytest.raises(HttpLoadError, match="not supported"):
            await client.get("/negative")
        with pytest.raises(HttpLoadError, match="interim"):
            await client.get("/interim")
        assert (await client.get("/close")).content == b"/close"
        assert (await client.get("/fine")).content == b"/fine"  # a new connection after "close"
        await client.aclose()
    assert len(accepted) == 7  # each failure, and the "close", cost its connection
    assert client.opened == 0  # every connection closed was counted out


async def test_requests_given_up_free_their_connection_and_turns_go_in_order() -> None:
    async with serving(answering) as (port, accepted):
        client = LoadClient("127.0.0.1", port, connections=1)
        hanging = asyncio.create_task(client.get("/hang"))
        queued = asyncio.create_task(client.get("/given-up"))
        waiting = [asyncio.create_task(client.get(f"/{n}")) for n in range(5)]
        await asyncio.sleep(0.05)
        queued.cancel()  # while waiting its turn
        hanging.cancel()  # with its request on the wire: its connection can't be used again
        answers = [await w for w in asyncio.as_completed(waiting)]
        await client.aclose()
    assert [a.content for a in answers] == [f"/{n}".encode() for n in range(5)]  # in order
    assert len(accepted) == 2  # the cancelled request's connection was replaced once
    assert client.opened == 0 and not client.idle


async def test_bytes_past_an_answer_or_between_requests_drop_the_connection() -> None:
    async with serving(answering) as (port, accepted):
        client = LoadClient("127.0.0.1", port, connections=1)
        assert (await client.get("/extra")).content == b"/extra"
        assert (await client.get("/next")).content == b"/next"  # not the stale bytes
        assert len(accepted) == 2
        [idle] = client.idle
        assert idle.transport is not None
        idle.data_received(b"HTTP/1.1 200 OK\r\n")  # as if sent while no request was out
        assert idle.closed
        assert (await client.get("/after")).content == b"/after"
        await client.aclose()
    assert len(accepted) == 3


async def test_closing_the_client_ends_requests_in_flight() -> None:
    async with serving(answering) as (port, _):
        client = LoadClient("127.0.0.1", port, connections=2)
        hanging = asyncio.create_task(client.get("/hang"))
        await asyncio.sleep(0.05)
        await client.aclose()
        with pytest.raises(HttpLoadError, match="connection lost"):
            await hanging
    assert client.opened == 0
