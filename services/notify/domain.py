"""Notify's rules, free of I/O: when an opportunity's next follow-up falls due."""

from __future__ import annotations

from datetime import datetime, timedelta

from shared.settings import Rules


def follow_up_due(stage: str, clock_started: datetime, rules: Rules) -> datetime | None:
    """Due `follow_up_days` after entering the stage (or the last follow-up); None where the
    stage has no follow-up rule (handover)."""
    days = rules.stages[stage].follow_up_days
    if days is None:
        return None
    return clock_started + timedelta(days=days)
