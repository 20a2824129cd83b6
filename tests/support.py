"""Test helpers that talk to the system the way its users do: partner messages signed with
plain hmac, produced and read with plain aiokafka."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import re
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.codec import gzip_encode
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

T = TypeVar("T")


def _mobile() -> str:
    """A random Chinese mobile number, 13x-19x: 7e9 of them, so thousands of leads in one run
    (the chaos suite, the benchmarks) do not share one and get merged as the same customer (one
    prefix's 1e8 gave two such pairs in 16,000 on average)."""
    n = uuid.uuid4().int % (7 * 10**9)
    return f"+86 1{3 + n // 10**9}{n // 10**8 % 10} {n % 10**8:08d}"


def lead_value(partner_id: str, message_id: str, company: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "message_id": message_id,
        "partner_id": partner_id,
        "submitted_at": "2026-11-22T09:00:00Z",
        "company": {
            "name": company or f"Northwind {uuid.uuid4().hex[:8]}",
            "industry": "logistics",
            "region": "CN-SN",
            "size": "200-999",
        },
        "contact": {  # a different customer each time, unless the test says otherwise
            "name": "Li Wei",
            "email": f"li.wei.{uuid.uuid4().hex[:10]}@example.cn",
            "phone": _mobile(),
        },
        "need": "dedicated line for 12 branches",
        "budget": {"amount": "350000.00", "currency": "CNY"},
        "authority": "decision_maker",
        "timeline": "this_quarter",
        "expected_close": "2027-01-31",
    }
    body.update(extra)
    return json.dumps(body).encode()


def lead_body(company: str | None = None) -> dict[str, Any]:
    """A lead as the partner client takes it: the partner fields are the client's to fill."""
    body = json.loads(lead_value("-", "-", company=company))
    for field in ("message_id", "partner_id", "submitted_at"):
        body.pop(field)
    return dict(body)


def signed_headers(
    partner_id: str, message_id: str, secret: str, value: bytes
) -> list[tuple[str, bytes]]:
    signature = "sha256=" + hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()
    return [
        ("x-partner-id", partner_id.encode()),
        ("x-message-id", message_id.encode()),
        ("x-signature", signature.encode()),
    ]


NOT_UTF8 = b"\xff\xfe"  # a header name no UTF-8 decoder takes
_PLACEHOLDER = "~~"  # as long as NOT_UTF8, and nowhere else in a batch built here
_CRC_AT, _LENGTH_AT, _ATTRIBUTES_AT, _RECORDS_AT = 17, 8, 21, 61  # in a v2 record batch


def record_batch(
    values: list[bytes],
    undecodable_at: int | None,
    compression: int = 0,
    base_offset: int = 0,
    key: bytes = b"k",
    headers: list[tuple[str, bytes]] | None = None,
) -> bytes:
    """A v2 record batch as a producer other than Java's may write it: the record at index
    `undecodable_at` has a header name that is not UTF-8 (None: a placeholder name stays, the
    same batch otherwise), after `headers` if given (else in place of an x-trace header).
    aiokafka's builder takes only text names: the batch is built with a placeholder, patched,
    compressed (gzip: 1) and its CRC-32C computed again."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for n, value in enumerate(values):
        if headers is None:
            names = [(_PLACEHOLDER if n == undecodable_at else "x-trace", b"v")]
        else:
            names = headers + ([(_PLACEHOLDER, b"v")] if n == undecodable_at else [])
        builder.append(n, timestamp=1_790_000_000_000 + n, key=key, value=value,
                       headers=names)  # fmt: skip
    raw = bytearray(builder.build())
    if undecodable_at is not None:
        at = raw.index(_PLACEHOLDER.encode())
        raw[at : at + len(NOT_UTF8)] = NOT_UTF8
    if compression:
        assert compression == 1, "gzip only"
        raw[_RECORDS_AT:] = gzip_encode(bytes(raw[_RECORDS_AT:]))
        struct.pack_into(">h", raw, _ATTRIBUTES_AT, compression)
    struct.pack_into(">qi", raw, 0, base_offset, len(raw) - 12)
    struct.pack_into(">I", raw, _CRC_AT, calc_crc32c(bytes(raw[_ATTRIBUTES_AT:])))
    return bytes(raw)


async def send_partner_messages(
    bootstrap: str, messages: list[tuple[str, bytes, list[tuple[str, bytes]]]]
) -> None:
    """(partner_id, value, headers) each, key = partner_id, with a plain aiokafka producer."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        acks = [
            await producer.send("partner.leads.v1", value, key=partner.encode(), headers=headers)
            for partner, value, headers in messages
        ]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def read_topic(
    bootstrap: str, topic: str, until: Callable[[list[Any]], bool], within: float = 30.0
) -> list[Any]:
    """Read a topic from the start with a plain consumer (no group) until `until(records)`."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
            if until(records):
                return records
        return records
    finally:
        await consumer.stop()


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    ok: Callable[[T], bool],
    within: float = 30.0,
    every: float = 0.2,
) -> T:
    """Poll `probe` (a coroutine function, or a plain function) every `every` seconds until
    `ok(result)`; return the last result either way (the test asserts)."""
    deadline = time.monotonic() + within

    async def look() -> T:
        result = probe()
        return await result if inspect.isawaitable(result) else result  # type: ignore[return-value]

    result = await look()
    while not ok(result) and time.monotonic() < deadline:
        await asyncio.sleep(every)
        result = await look()
    return result


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to `url`, closed after."""
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def terminate(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Stop a process as an operator would: SIGTERM, and SIGKILL if it has not exited within
    `grace` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(process.wait, grace)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait, 10)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in a /metrics text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        seen = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(seen.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


@asynccontextmanager
async def served(app: Any, log_level: str = "warning") -> AsyncIterator[int]:
    """`app` (ASGI) served by uvicorn in this event loop on a free port until the block ends;
    yields the port once it listens."""
    import uvicorn

    from shared.devstack import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()  # it failed to start: say why
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await serving


async def at_once(*calls: Callable[[], T]) -> list[T]:
    """Run blocking calls in threads of their own, let go at the same moment (a race between
    replicas, or two requests, made to happen)."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait()
        return call()

    return list(await asyncio.gather(*(asyncio.to_thread(run, c) for c in calls)))
