"""Hostile partner input at volume (SPEC §3): 10,000 messages generated with hypothesis — wrong
types, huge strings, invalid UTF-8, deep nesting, missing headers, wrong signatures, replayed
message ids — sent with a plain producer. The consumer keeps running, every message naming a
known partner gets exactly one reply, and only valid, signed messages become leads."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as explore
from hypothesis import strategies as st

from shared.settings import Settings
from tests.support import lead_value, read_topic, send_partner_messages, signed_headers

MESSAGES = 10_000
PER_EXAMPLE = 100

Message = tuple[str, bytes, list[tuple[str, bytes]], bool]  # key, value, headers, should be a lead


def scenarios(partner: str, secret: str) -> st.SearchStrategy[tuple[str, Any, Any, str]]:
    body = st.one_of(
        st.just("valid"),
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.integers(1, 4000).map(lambda n: b"[" * n),
        st.just(b'{"company": {"name": "' + b"x" * 70_000 + b'"}}'),
        st.just(b"\xff\xfe\xfa not utf-8"),
        st.fixed_dictionaries(
            {
                "company": st.one_of(
                    st.none(),
                    st.integers(),
                    st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
                ),
                "contact": st.one_of(st.none(), st.lists(st.integers())),
                "budget": st.one_of(
                    st.floats(),
                    st.text(max_size=10),
                    st.just({"amount": "1e99", "currency": "CNY"}),
                ),
            }
        ).map(lambda d: json.dumps(d).encode()),
    )
    who = st.sampled_from([partner, partner, partner, "stranger", ""])
    signing = st.sampled_from(["good", "good", "wrong", "missing"])
    message_id = st.sampled_from(["fresh", "fresh", "replayed", "missing"])
    return st.tuples(who, body, signing, message_id)


def build(
    partner: str, secret: str, drawn: list[tuple[str, Any, str, str]], used: list[str]
) -> list[Message]:
    built: list[Message] = []
    for who, body, signing, id_kind in drawn:
        if id_kind == "fresh" or (id_kind == "replayed" and not used):
            message_id = f"{partner}-h{uuid.uuid4().hex}"
            used.append(message_id)
        elif id_kind == "replayed":
            message_id = used[len(used) // 2]
        else:
            message_id = ""
        value = lead_value(partner, message_id) if body == "valid" else body
        headers = signed_headers(
            who or partner, message_id, secret if signing == "good" else "nope", value
        )
        headers = [
            (k, v)
            for k, v in headers
            if not (k == "x-signature" and signing == "missing")
            and not (k == "x-message-id" and not message_id)
            and not (k == "x-partner-id" and not who)
        ]
        # With no x-partner-id header, the key names the partner (as the intake reads it).
        valid = body == "valid" and signing == "good" and who in (partner, "") and bool(message_id)
        built.append((who or partner, value, headers, valid))
    return built


async def test_ten_thousand_hostile_messages(settings: Settings, intake) -> None:  # type: ignore[no-untyped-def]
    app, partner, secret = intake
    drawn: list[tuple[str, Any, str, str]] = []

    @explore(
        max_examples=MESSAGES // PER_EXAMPLE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(scenarios(partner, secret), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def generate(batch: list[tuple[str, Any, str, str]]) -> None:
        drawn.extend(batch)

    generate()
    used: list[str] = []
    messages = build(partner, secret, drawn, used)
    assert len(messages) >= MESSAGES
    await send_partner_messages(
        settings.bootstrap_servers(), [(key, value, headers) for key, value, headers, _ in messages]
    )
    known = sum(
        1
        for key, _, headers, _ in messages
        if dict(headers).get("x-partner-id", key.encode()) == partner.encode()
    )
    replies = await read_topic(
        settings.bootstrap_servers(),
        f"partner.{partner}.replies.v1",
        lambda r: len(r) >= known,
        within=240,
    )
    await asyncio.sleep(2)  # anything extra would arrive now
    assert len(replies) == known  # exactly one answer per message that names the partner
    valid_ids = {dict(h)["x-message-id"].decode() for _, _, h, valid in messages if valid}
    accepted = [json.loads(r.value) for r in replies if json.loads(r.value)["status"] == "accepted"]
    assert accepted and {a["message_id"] for a in accepted} <= valid_ids
    stored = app.existing_ids([uuid.UUID(a["lead_id"]) for a in accepted])
    assert len(stored) == len(accepted)  # every accepted reply is a stored lead
