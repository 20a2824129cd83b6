"""Bases of the stored events every service publishes: each carries its public name, its payload
(the pydantic contract, dumped), and where it came from. Pure: no I/O."""

from __future__ import annotations

from typing import Any, ClassVar

from eventsourcing.domain import Aggregate


class PublishedCreated(Aggregate.Created):
    """The first event of a published stream."""

    public_name: ClassVar[str] = ""
    payload: dict[str, Any]
    correlation_id: str
    causation_id: str


class Published(Aggregate.Event):
    """A later event of a published stream."""

    public_name: ClassVar[str] = ""
    payload: dict[str, Any]
    correlation_id: str
    causation_id: str
