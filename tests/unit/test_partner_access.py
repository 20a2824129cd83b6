"""A partner's Kafka user and ACLs (SPEC §8): write the intake topic, read only its own replies."""

from __future__ import annotations

import shlex

from services.capture.access import access_commands, partner_grants, partner_user
from shared.contracts.topics import PARTNER_LEADS, partner_replies


def test_a_partner_may_write_the_intake_and_read_only_its_own_replies() -> None:
    grants = {(g.resource, g.name): set(g.operations) for g in partner_grants("acme")}
    assert grants[("topic", PARTNER_LEADS)] == {"Write", "Describe"}
    assert grants[("topic", partner_replies("acme"))] == {"Read", "Describe"}
    readable = [name for (kind, name), ops in grants.items() if kind == "topic" and "Read" in ops]
    assert readable == [partner_replies("acme")]  # no other partner's replies, no wildcard
    assert all("*" not in name for _, name in grants)


def test_partner_add_prints_the_commands_that_create_the_user_and_grants() -> None:
    commands = [shlex.split(c) for c in access_commands("acme", "kafka-1:9092", config="a.conf")]
    user = commands[0]
    assert user[0] == "kafka-configs.sh" and partner_user("acme") in user
    assert "--command-config" in user and "a.conf" in user
    assert any(arg.startswith("SCRAM-SHA-512=[password=") for arg in user)
    acls = commands[1:]
    assert all(c[0] == "kafka-acls.sh" and "User:partner-acme" in c for c in acls)
    topics = {c[c.index("--topic") + 1]: c for c in acls if "--topic" in c}
    assert set(topics) == {PARTNER_LEADS, partner_replies("acme")}
    assert "Write" in topics[PARTNER_LEADS] and "Read" not in topics[PARTNER_LEADS]
    assert (
        "Read" in topics[partner_replies("acme")] and "Write" not in topics[partner_replies("acme")]
    )
    group = next(c for c in acls if "--group" in c)
    assert group[group.index("--resource-pattern-type") + 1] == "prefixed"
    assert group[group.index("--group") + 1] == "partner-acme."  # not a prefix of acmecorp's
