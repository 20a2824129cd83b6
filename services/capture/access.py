"""What a partner may do on a real Kafka cluster: a SASL/SCRAM user of its own, allowed to write
`partner.leads.v1` and to read only its own `partner.<partner_id>.replies.v1` (SPEC §8).

`dealstream partner add` prints the commands that create them with Kafka's own tools; the
embedded dev broker has no authentication, so there they are for reading, not running."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from shared.contracts.topics import PARTNER_LEADS, partner_replies


def partner_user(partner_id: str) -> str:
    """The SASL user name of a partner."""
    return f"partner-{partner_id}"


@dataclass(frozen=True)
class Grant:
    """One ACL: `operations` on a topic or consumer group (prefixed: every name it starts)."""

    resource: str  # "topic" | "group"
    name: str
    operations: tuple[str, ...]
    prefixed: bool = False


def partner_grants(partner_id: str) -> list[Grant]:
    """Everything a partner is allowed: nothing else is (Kafka denies what no ACL allows once
    an authorizer runs)."""
    return [
        Grant("topic", PARTNER_LEADS, ("Write", "Describe")),
        Grant("topic", partner_replies(partner_id), ("Read", "Describe")),
        # A partner that reads its replies in consumer groups of its own naming, `partner-<id>.…`
        # (the dot ends the id, which never holds one: `partner-acme` would match acmecorp's).
        Grant("group", f"{partner_user(partner_id)}.", ("Read",), prefixed=True),
    ]


def access_commands(
    partner_id: str, bootstrap: str, mechanism: str = "SCRAM-SHA-512", config: str | None = None
) -> list[str]:
    """The `kafka-configs.sh` and `kafka-acls.sh` commands that create the partner's user and
    grants (`config`: an admin client properties file for a secured cluster)."""
    user = partner_user(partner_id)
    admin = ["--bootstrap-server", bootstrap, *(["--command-config", config] if config else [])]
    commands = [
        [
            "kafka-configs.sh",
            *admin,
            "--alter",
            "--entity-type",
            "users",
            "--entity-name",
            user,
            "--add-config",
            f"{mechanism}=[password=<a new password for {user}>]",
        ]
    ]
    for grant in partner_grants(partner_id):
        command = ["kafka-acls.sh", *admin, "--add", "--allow-principal", f"User:{user}"]
        for operation in grant.operations:
            command += ["--operation", operation]
        command += [f"--{grant.resource}", grant.name]
        if grant.prefixed:
            command += ["--resource-pattern-type", "prefixed"]
        commands.append(command)
    return [shlex.join(command) for command in commands]
