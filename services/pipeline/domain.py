"""The Opportunity aggregate, free of I/O: every event of SPEC §4 and the rules that refuse a
command (each refusal a stable, public code)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

from eventsourcing.domain import Aggregate

from services.pipeline.rules import Route, bant, tier
from shared.clock import utc_from_iso
from shared.contracts import events as contract
from shared.contracts.common import MAX_AMOUNT, Contract, Money
from shared.domain import Published, PublishedCreated
from shared.settings import STAGES, Rules

PROMISE_REACH = timedelta(days=5 * 366)  # a next follow-up promised, either side of now

OPPORTUNITY_NAMESPACE = uuid.UUID("c2f0d8a4-1b7e-4f3a-9e61-7d2b5a9c4e08")
SYSTEM = "system"


def opportunity_id_for(lead_id: uuid.UUID) -> uuid.UUID:
    """One lead opens one opportunity, however often its event is delivered."""
    return uuid.uuid5(OPPORTUNITY_NAMESPACE, str(lead_id))


class Refused(Exception):
    """A command the rules refuse; `code` is stable and public."""

    def __init__(self, code: str, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


def _payload(model: Contract) -> dict[str, Any]:
    return model.model_dump(mode="json")


class Opportunity(Aggregate):
    class Opened(PublishedCreated):
        public_name: ClassVar[str] = "OpportunityOpened"

    class Changed(Published):
        """Base of every later event: the payload is its public contract."""

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Opportunity)
            aggregate.when(self.public_name, self.payload, self.timestamp)

    class Scored(Changed):
        public_name: ClassVar[str] = "OpportunityScored"

    class Assigned(Changed):
        public_name: ClassVar[str] = "OpportunityAssigned"

    class StageChanged(Changed):
        public_name: ClassVar[str] = "OpportunityStageChanged"

    class ProbabilityOverridden(Changed):
        public_name: ClassVar[str] = "OpportunityProbabilityOverridden"

    class FollowUpLogged(Changed):
        public_name: ClassVar[str] = "FollowUpLogged"

    class AmountChanged(Changed):
        public_name: ClassVar[str] = "OpportunityAmountChanged"

    class Won(Changed):
        public_name: ClassVar[str] = "OpportunityWon"

    class PaymentReceived(Changed):
        public_name: ClassVar[str] = "PaymentReceived"

    class Lost(Changed):
        public_name: ClassVar[str] = "OpportunityLost"

    class Reopened(Changed):
        public_name: ClassVar[str] = "OpportunityReopened"

    class Recycled(Changed):
        public_name: ClassVar[str] = "OpportunityRecycled"

    class Reactivated(Changed):
        public_name: ClassVar[str] = "OpportunityReactivated"

    class LeadAttached(Changed):
        public_name: ClassVar[str] = "LeadAttached"

    class LeadDetached(Changed):
        public_name: ClassVar[str] = "LeadDetached"

    def __init__(self, payload: dict[str, Any], correlation_id: str, causation_id: str) -> None:
        # The payload is an OpportunityOpened as `open_from_lead` made it, checked in full then:
        # read as written (JSON values, the contract's defaults for what an older one lacks),
        # not validated again at every open and every load (a tenth of opening a lead).
        amount = payload.get("amount")
        self.lead_id = uuid.UUID(payload["lead_id"])
        self.lead_ids = [self.lead_id]
        self.title: str = payload["title"]
        self.company: str = payload["company"]
        self.region: str | None = payload.get("region")
        self.industry: str | None = payload.get("industry")
        self.partner_id: str | None = payload.get("partner_id")
        self.source: str = payload["source"]
        self.expected_close: str | None = payload.get("expected_close")
        self.authority: str = payload.get("authority", "unknown")
        self.stage: str = payload["stage"]
        self.probability: int = payload["probability"]
        self.probability_overridden = False
        self.status = "open"
        self.amount: Money | None = None if amount is None else Money.model_validate(amount)
        self.proposal_amount: Money | None = None
        self.contract_amount: Money | None = None
        self.received: Money | None = None
        self.owner: str | None = None
        self.team: str | None = None
        self.score = 0
        self.grade = "D"
        self.tier = "small"
        self.lost_stage: str | None = None
        self.opened_at = utc_from_iso(payload["opened_at"])
        self.stage_entered_at = self.opened_at
        self.last_activity_at = self.opened_at
        self.correlation_id = correlation_id

    # -- how each event changes the state ------------------------------------------------------

    def when(self, name: str, data: dict[str, Any], at: datetime) -> None:
        if name == "OpportunityScored":
            self.score, self.grade, self.tier = data["score"], data["grade"], data["tier"]
        elif name in ("OpportunityAssigned", "OpportunityReactivated"):
            self.owner, self.team = data["owner"], data["team"]
            if name == "OpportunityReactivated":
                self.status = "open"
        elif name == "OpportunityStageChanged":
            self.stage, self.probability = data["to_stage"], data["probability"]
            self.probability_overridden = False
            self.stage_entered_at = at
        elif name == "OpportunityProbabilityOverridden":
            self.probability, self.probability_overridden = data["probability"], True
        elif name == "FollowUpLogged":
            self.authority = data.get("authority") or self.authority
        elif name == "OpportunityAmountChanged":
            money = Money.model_validate(data["amount"])
            if data["kind"] == "proposal":
                self.proposal_amount = money
            self.amount, self.tier = money, data["tier"]
        elif name == "OpportunityWon":
            self.status, self.stage, self.probability = "won", "F", 100
            self.probability_overridden = False
            self.contract_amount = Money.model_validate(data["contract_amount"])
            self.stage_entered_at = at
        elif name == "PaymentReceived":
            self.received = Money.model_validate(data["total_received"])
        elif name == "OpportunityLost":
            self.status, self.lost_stage = "lost", data["stage"]
        elif name == "OpportunityReopened":
            self.status, self.stage, self.probability = "open", data["stage"], data["probability"]
            self.probability_overridden = False
            self.lost_stage = None
            self.stage_entered_at = at
        elif name == "OpportunityRecycled":
            self.status, self.owner = "recycled", None
        elif name == "LeadAttached":
            self.lead_ids.append(uuid.UUID(data["lead_id"]))
        elif name == "LeadDetached":
            self.lead_ids.remove(uuid.UUID(data["lead_id"]))
        if name not in ("OpportunityScored", "PaymentReceived", "LeadAttached", "LeadDetached"):
            self.last_activity_at = at

    # -- commands --------------------------------------------------------------------------

    @classmethod
    def open_from_lead(
        cls,
        lead: contract.LeadCaptured,
        rules: Rules,
        assignment: Route,
        event_id: str,
        correlation_id: str,
        opportunity_id: uuid.UUID | None = None,
        opened_at: datetime | None = None,
    ) -> Opportunity:
        """Open in stage A, scored, tiered and assigned: three events, one transaction (its id
        is `opportunity_id_for` the lead's, given when the caller has it already), at the lead's
        capture (or at `opened_at`: a lead unmerged later opens its deal then)."""
        opportunity_id = opportunity_id or opportunity_id_for(lead.lead_id)
        at = opened_at or lead.captured_at
        title = lead.company.name if not lead.need else f"{lead.company.name}: {lead.need}"
        opened = contract.OpportunityOpened(
            opportunity_id=opportunity_id,
            lead_id=lead.lead_id,
            title=title[:200],
            stage="A",
            probability=rules.probability("A"),
            amount=lead.budget,
            source=lead.source,
            partner_id=lead.partner_id,
            company=lead.company.name,
            region=lead.company.region,
            industry=lead.company.industry,
            authority=lead.authority.value,
            expected_close=lead.expected_close.isoformat() if lead.expected_close else None,
            opened_at=at,
        )
        opportunity = cls._create(
            cls.Opened,
            id=opportunity_id,
            payload=_payload(opened),
            correlation_id=correlation_id,
            causation_id=event_id,
            timestamp=at,
        )
        with opportunity.acting(correlation_id, event_id):
            score = bant(lead)
            opportunity._emit(
                cls.Scored,
                contract.OpportunityScored(
                    opportunity_id=opportunity_id,
                    score=score.total,
                    grade=score.grade,
                    budget=score.budget,
                    authority=score.authority,
                    need=score.need,
                    timeline=score.timeline,
                    tier=tier(lead.budget, rules.tiers),
                ),
                at,
            )
            opportunity._emit(
                cls.Assigned,
                contract.OpportunityAssigned(
                    opportunity_id=opportunity_id,
                    owner=assignment.owner,
                    team=assignment.team,
                    rule=assignment.rule,
                    actor=SYSTEM,
                    assigned_at=at,
                ),
                at,
            )
        return opportunity

    # What began the command in hand (a request, a lead event, a tick): set by `acting`, so
    # every event it emits names it without each command taking it as arguments.
    _context: tuple[str, str] = ("", "")

    @contextmanager
    def acting(self, correlation_id: str, causation_id: str = "") -> Iterator[None]:
        self._context = (correlation_id, causation_id or correlation_id)
        try:
            yield
        finally:
            del self._context

    def _emit(self, event_class: type[Changed], model: Contract, at: datetime) -> None:
        correlation_id, causation_id = self._context
        self.trigger_event(
            event_class,
            payload=_payload(model),
            correlation_id=correlation_id,
            causation_id=causation_id,
            timestamp=at,
        )

    def _require_status(self, *allowed: str) -> None:
        if self.status not in allowed:
            raise Refused(
                "not_open" if "open" in allowed else "wrong_status",
                f"opportunity is {self.status}",
                status=self.status,
            )

    def missing_exit_criteria(self, rules: Rules) -> list[str]:
        have = {
            "budget": self.amount is not None and self.amount.amount > 0,
            "decision_maker": self.authority == "decision_maker",
            "proposal_amount": self.proposal_amount is not None,
        }
        return [c for c in rules.exit_criteria.get(self.stage, []) if not have[c]]

    def change_stage(
        self,
        to_stage: str,
        actor: str,
        now: datetime,
        rules: Rules,
        note: str | None = None,
    ) -> None:
        self._require_status("open")
        if to_stage not in STAGES:
            raise Refused("unknown_stage", f"no stage {to_stage!r}")
        step = STAGES.index(to_stage) - STAGES.index(self.stage)
        if step == 0:
            raise Refused("same_stage", f"already in stage {to_stage}")
        if to_stage == "F":
            raise Refused("use_win", "F is reached by winning: POST /win")
        if step > 1:
            raise Refused("stage_skip", f"cannot skip from {self.stage} to {to_stage}")
        if step < 0 and not (note and note.strip()):
            raise Refused("note_required", "moving back needs a note")
        if step > 0 and (missing := self.missing_exit_criteria(rules)):
            raise Refused(
                "exit_criteria_unmet", f"stage {self.stage} needs {missing}", missing=missing
            )
        self._emit(
            self.StageChanged,
            contract.OpportunityStageChanged(
                opportunity_id=self.id,
                from_stage=self.stage,
                to_stage=to_stage,
                probability=rules.probability(to_stage),
                actor=actor,
                note=note,
                changed_at=now,
            ),
            now,
        )

    def override_probability(
        self,
        probability: int,
        actor: str,
        now: datetime,
        note: str | None = None,
    ) -> None:
        self._require_status("open")
        if not 0 <= probability <= 100:
            raise Refused("invalid_probability", "probability is 0..100")
        self._emit(
            self.ProbabilityOverridden,
            contract.OpportunityProbabilityOverridden(
                opportunity_id=self.id,
                stage=self.stage,
                probability=probability,
                previous=self.probability,
                actor=actor,
                note=note,
                overridden_at=now,
            ),
            now,
        )

    def log_follow_up(
        self,
        channel: str,
        summary: str,
        actor: str,
        now: datetime,
        next_follow_up_at: datetime | None = None,
        authority: str | None = None,
    ) -> None:
        self._require_status("open")
        if next_follow_up_at is not None and not (
            now - PROMISE_REACH <= next_follow_up_at <= now + PROMISE_REACH
        ):
            # Notify reminds and escalates from it: a promise in year 1 was the most overdue
            # timer of all, first at every tick, and in a zone such as Europe/London its local
            # time could not be written (OverflowError), which stopped every reminder.
            days = PROMISE_REACH.days
            raise Refused("follow_up_out_of_range",
                          f"next_follow_up_at must be within {days} days of now")  # fmt: skip
        self._emit(
            self.FollowUpLogged,
            contract.FollowUpLogged(
                opportunity_id=self.id,
                channel=channel,
                summary=summary,
                next_follow_up_at=next_follow_up_at,
                authority=authority,
                stage=self.stage,
                actor=actor,
                logged_at=now,
            ),
            now,
        )

    def change_amount(
        self,
        kind: str,
        amount: Money,
        actor: str,
        now: datetime,
        rules: Rules,
    ) -> None:
        self._require_status("open")
        self._emit(
            self.AmountChanged,
            contract.OpportunityAmountChanged(
                opportunity_id=self.id,
                kind=kind,
                amount=amount,
                previous=self.amount,
                tier=tier(amount, rules.tiers),
                actor=actor,
                changed_at=now,
            ),
            now,
        )

    def win(
        self,
        contract_amount: Money,
        actor: str,
        now: datetime,
        rules: Rules,
    ) -> None:
        self._require_status("open")
        if self.stage != "E":
            raise Refused("not_closing", f"winning needs stage E, not {self.stage}")
        if missing := self.missing_exit_criteria(rules):  # winning leaves E for F
            raise Refused("exit_criteria_unmet", f"stage E needs {missing}", missing=missing)
        if self.amount is not None and contract_amount.currency != self.amount.currency:
            # One currency a deal: its amounts, contract and payments are reported together.
            raise Refused("currency_mismatch", f"the deal's amount is in {self.amount.currency};"
                          " change the amount first to win in another currency")  # fmt: skip
        self._emit(
            self.Won,
            contract.OpportunityWon(
                opportunity_id=self.id,
                contract_amount=contract_amount,
                from_stage=self.stage,
                actor=actor,
                won_at=now,
            ),
            now,
        )

    def receive_payment(
        self,
        amount: Money,
        actor: str,
        now: datetime,
    ) -> None:
        if self.status != "won" or self.contract_amount is None:
            raise Refused("not_won", f"payments follow a win; opportunity is {self.status}")
        if amount.currency != self.contract_amount.currency:
            raise Refused("currency_mismatch", f"contract is in {self.contract_amount.currency}")
        before = self.received.amount if self.received else Decimal(0)
        if before + amount.amount >= MAX_AMOUNT:  # what Money holds, and the stored columns
            raise Refused("amount_out_of_range",
                          f"payments received would reach {MAX_AMOUNT:,}")  # fmt: skip
        total = Money(amount=before + amount.amount, currency=amount.currency)
        self._emit(
            self.PaymentReceived,
            contract.PaymentReceived(
                opportunity_id=self.id,
                amount=amount,
                total_received=total,
                actor=actor,
                received_at=now,
            ),
            now,
        )

    def lose(
        self,
        reason_code: str,
        actor: str,
        now: datetime,
        rules: Rules,
        note: str | None = None,
        competitor: str | None = None,
    ) -> None:
        self._require_status("open")
        if reason_code not in rules.loss_reasons:
            raise Refused("unknown_reason", f"reason_code must be one of {rules.loss_reasons}")
        self._emit(
            self.Lost,
            contract.OpportunityLost(
                opportunity_id=self.id,
                reason_code=reason_code,
                note=note,
                competitor=competitor,
                stage=self.stage,
                actor=actor,
                lost_at=now,
            ),
            now,
        )

    def reopen(
        self,
        actor: str,
        now: datetime,
        rules: Rules,
        note: str | None = None,
    ) -> None:
        if self.status != "lost" or self.lost_stage is None:
            raise Refused("not_lost", f"only a lost opportunity reopens; it is {self.status}")
        self._emit(
            self.Reopened,
            contract.OpportunityReopened(
                opportunity_id=self.id,
                stage=self.lost_stage,
                probability=rules.probability(self.lost_stage),
                actor=actor,
                note=note,
                reopened_at=now,
            ),
            now,
        )

    def assign(
        self,
        owner: str | None,
        team: str | None,
        actor: str,
        now: datetime,
        rule: str = "manual",
    ) -> None:
        self._require_status("open")
        self._emit(
            self.Assigned,
            contract.OpportunityAssigned(
                opportunity_id=self.id,
                owner=owner,
                team=team,
                previous_owner=self.owner,
                rule=rule,
                actor=actor,
                assigned_at=now,
            ),
            now,
        )

    def recycle(
        self,
        now: datetime,
        rules: Rules,
        actor: str = "scheduler",
    ) -> None:
        self._require_status("open")
        idle_days = (now - self.last_activity_at).days
        if idle_days < rules.recycle_days:
            raise Refused(
                "not_idle", f"idle {idle_days} days, recycling needs {rules.recycle_days}"
            )
        self._emit(
            self.Recycled,
            contract.OpportunityRecycled(
                opportunity_id=self.id,
                previous_owner=self.owner,
                team=self.team,
                idle_since=self.last_activity_at,
                idle_days=idle_days,
                actor=actor,
                recycled_at=now,
            ),
            now,
        )

    def reactivate(
        self,
        owner: str | None,
        team: str | None,
        actor: str,
        now: datetime,
    ) -> None:
        if self.status != "recycled":
            raise Refused(
                "not_recycled", f"only a recycled opportunity reactivates; it is {self.status}"
            )
        self._emit(
            self.Reactivated,
            contract.OpportunityReactivated(
                opportunity_id=self.id,
                owner=owner,
                team=team or self.team,
                actor=actor,
                reactivated_at=now,
            ),
            now,
        )

    def detach_lead(self, lead_id: uuid.UUID, to_opportunity_id: uuid.UUID, actor: str,
                    now: datetime) -> None:  # fmt: skip
        """A lead attached here was unmerged: it leaves for a deal of its own (the lead this
        opportunity was opened from never leaves)."""
        if lead_id not in self.lead_ids or lead_id == self.lead_id:
            return
        self._emit(
            self.LeadDetached,
            contract.LeadDetached(
                opportunity_id=self.id,
                lead_id=lead_id,
                to_opportunity_id=to_opportunity_id,
                actor=actor,
                detached_at=now,
            ),
            now,
        )

    def attach_lead(self, lead_id: uuid.UUID, rule: str, now: datetime) -> None:
        if lead_id in self.lead_ids:
            return
        self._emit(
            self.LeadAttached,
            contract.LeadAttached(
                opportunity_id=self.id,
                lead_id=lead_id,
                rule=rule,
                attached_at=now,
            ),
            now,
        )
