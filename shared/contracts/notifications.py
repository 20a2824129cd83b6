"""What notify publishes: a `NotificationIssued` envelope on `notification.events.v1` for every
reminder, escalation, warning and digest, and a `NotificationUndeliverable` dead letter when a
channel gave up."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field

from shared.contracts.common import Contract, UtcTime

NotificationKind = Literal[
    "follow_up_due",  # the owner's follow-up is due
    "escalation",  # overdue: the team manager (or, for major deals, the branch manager)
    "stale_warning",  # no activity for stale_days
    "expected_close_passed",  # still open after its expected close date
    "recycled",  # pipeline returned it to the pool: the pool's manager is told
    "weekly_digest",  # Monday 09:00 local, to each manager
]
Channel = Literal["email", "webhook", "kafka"]


class DigestLine(Contract):
    opportunity_id: uuid.UUID
    title: str
    stage: str
    owner: str | None
    tier: str
    due_at: UtcTime | None = None
    overdue_days: int | None = None
    last_activity_at: UtcTime


class NotificationIssued(Contract):
    """One notification to one recipient. `derived_from` names the events that started its clock
    (the stage entry, the follow-up, the recycling), so anyone can see why it fired; `chain` is
    the escalation path (owner → team manager → branch manager); `before`/`after` are the values
    that changed the picture."""

    notification_id: uuid.UUID
    kind: NotificationKind
    opportunity_id: uuid.UUID | None = None
    team: str | None = None
    recipient: str | None
    recipient_role: Literal["owner", "manager", "branch_manager"]
    locale: Literal["en", "zh-CN"]
    subject: str
    body: str
    link: str | None = None
    due_at: UtcTime | None = None
    overdue_days: int | None = None
    chain: list[str] = Field(default_factory=list)
    derived_from: list[uuid.UUID] = Field(default_factory=list)
    before: dict[str, Any] = Field(default_factory=dict)
    after: dict[str, Any] = Field(default_factory=dict)
    lines: list[DigestLine] = Field(default_factory=list)  # weekly digests
    channels: list[Channel]
    issued_at: UtcTime


class NotificationUndeliverable(Contract):
    """The value on `dead-letter.v1` when a channel failed every attempt."""

    notification_id: uuid.UUID
    channel: Channel
    address: str | None
    attempts: int
    last_error: str
    failed_at: UtcTime
    notification: NotificationIssued
    kind: Literal["notification_undeliverable"] = "notification_undeliverable"


NOTIFICATION_EVENT_TYPES: dict[str, tuple[type[Contract], int]] = {
    "NotificationIssued": (NotificationIssued, 1),
}
