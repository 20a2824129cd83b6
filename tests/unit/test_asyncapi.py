"""The bus contract document: generated from the code, committed, and versioned — a contract
change without a new CONTRACTS_VERSION fails here."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from services.cli import cmd_asyncapi
from shared.contracts.asyncapi import CONTRACTS_VERSION, canonical, document, fingerprint
from shared.contracts.events import EVENT_TYPES
from shared.contracts.topics import CORE_TOPICS

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_document_is_the_one_the_code_generates() -> None:
    committed = (ROOT / "docs" / "asyncapi.json").read_text()
    assert committed == canonical(document()), (
        "the contracts changed: run `dealstream asyncapi --write` (and bump CONTRACTS_VERSION "
        "in shared/contracts/asyncapi.py if this version was released)"
    )


def test_this_contracts_version_names_exactly_this_content() -> None:
    lock = json.loads((ROOT / "docs" / "asyncapi.lock.json").read_text())
    assert lock[CONTRACTS_VERSION] == fingerprint(document()), (
        f"contracts {CONTRACTS_VERSION} already said something else: bump CONTRACTS_VERSION"
    )


def test_every_topic_and_event_type_is_in_the_document() -> None:
    doc = document()
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert set(CORE_TOPICS) <= addresses and "partner.{partner_id}.replies.v1" in addresses
    listed = {name for channel in doc["channels"].values() for name in channel["messages"]}
    assert set(EVENT_TYPES) <= listed
    schemas = doc["components"]["schemas"]
    assert {"Envelope", "PartnerLeadMessage", "PartnerReply", "Money"} <= set(schemas)
    assert schemas["Money"]["properties"]["amount"]["type"] == "string"


def test_writing_refuses_to_change_a_released_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "asyncapi.lock.json").write_text(json.dumps({CONTRACTS_VERSION: "0" * 64}))
    assert cmd_asyncapi(argparse.Namespace(write=True)) == 1
    assert not (tmp_path / "docs" / "asyncapi.json").exists()
    os.remove(tmp_path / "docs" / "asyncapi.lock.json")
    assert cmd_asyncapi(argparse.Namespace(write=True)) == 0
    assert (
        json.loads((tmp_path / "docs" / "asyncapi.json").read_text())["info"]["version"]
        == CONTRACTS_VERSION
    )
