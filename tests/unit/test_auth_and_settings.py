"""Tokens (SPEC §8), rules from dealstream.toml, and the consumer's republish filter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.notify.domain import follow_up_days
from shared.auth import InvalidToken, Principal, Role, issue_token, verify_token
from shared.bus.consumer import _fresh
from shared.settings import Rules, load_rules

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def test_tokens_carry_role_user_and_team_and_expire() -> None:
    token = issue_token(
        Principal(role=Role.manager, user="wang", team="xian"), "k" * 32, NOW, timedelta(hours=1)
    )
    assert verify_token(token, "k" * 32, NOW) == Principal(
        role=Role.manager, user="wang", team="xian"
    )
    with pytest.raises(InvalidToken):
        verify_token(token, "other-secret" * 4, NOW)
    with pytest.raises(InvalidToken):
        verify_token(token, "k" * 32, NOW + timedelta(hours=2))
    with pytest.raises(InvalidToken):
        verify_token("garbage", "k" * 32, NOW)


def test_rules_default_to_the_spec_and_load_from_toml(tmp_path: Path) -> None:
    assert Rules().probability("D") == 75
    assert load_rules(tmp_path / "missing.toml") == Rules()
    config = tmp_path / "dealstream.toml"
    config.write_text(
        '[rules]\nregistration_days = 30\n[rules.stages.A]\nname = "understand"\n'
        'name_zh = "了解商机"\nprobability = 5\nfollow_up_days = 2\n'
        "[notify]\nescalate_after_days = 3\n"
        "[notify.follow_up_days_by_tier.major]\nA = 1\n"
    )
    rules = load_rules(config)
    assert rules.registration_days == 30 and rules.probability("A") == 5
    assert follow_up_days("A", "small", rules) == 2 and follow_up_days("A", "major", rules) == 1
    assert follow_up_days("F", "small", Rules()) is None
    assert rules.notify.escalate_after_days == 3
    # One stage configured, one field of it: the other fields and stages keep their defaults.
    config.write_text("[rules.stages.B]\nprobability = 30\n")
    rules = load_rules(config)
    assert [rules.probability(s) for s in "ABCDEF"] == [10, 30, 50, 75, 90, 100]
    assert rules.stages["B"].name == "confirm" and rules.stages["B"].follow_up_days == 5
    config.write_text("[rules.stages.G]\nprobability = 30\n")
    with pytest.raises(ValueError, match="no stage G"):
        load_rules(config)


def test_republished_ids_are_applied_once_in_order() -> None:
    items = [("p0", n, f"e{n}") for n in (5, 6, 7, 5, 6, 7, 8)]
    assert _fresh(items, {"p0": 5}) == [("p0", 6, "e6"), ("p0", 7, "e7"), ("p0", 8, "e8")]
    assert _fresh(items, {"p0": 8}) == []


def test_each_upstream_of_a_fetch_is_kept_to_its_own_position() -> None:
    items = [("p0", 3, "a"), ("p1", 3, "b"), ("p0", 4, "c"), ("p1", 2, "d"), ("p1", 5, "e")]
    assert _fresh(items, {"p0": 3, "p1": 0}) == [("p1", 3, "b"), ("p0", 4, "c"), ("p1", 5, "e")]


def test_drain_runs_pages_until_one_is_empty() -> None:
    from shared.runtime import drain

    pages = [[1, 2], [3], []]
    assert drain(lambda: pages.pop(0)) == [1, 2, 3]
