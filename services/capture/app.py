"""Capture's use cases over its event store: web-form leads, and batches of partner messages
judged, deduped, stored and answered in one transaction with their position. The customer keys
(e-mail, phone, company in region) that dedupe matches on are written with the leads."""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import IntegrityError, StoredEvent
from psycopg.sql import SQL

from services.capture.domain import (
    Incoming,
    Lead,
    Match,
    PartnerMessage,
    Registration,
    Verdict,
    judge,
)
from services.capture.normalize import match_keys
from shared.bus.consumer import record_tracked
from shared.contracts.partner import (
    DeadLetter,
    PartnerReply,
    RegistrationStatus,
    ReplyStatus,
    WebFormLead,
)
from shared.contracts.partner import Registration as RegistrationView
from shared.privacy import is_sealed, keyed_hash, new_key, unseal
from shared.settings import Rules
from shared.store.eventstore import EventStoreApp
from shared.store.migrations import BUS_TABLES, Migration, event_store
from shared.store.recorder import SideWrite, as_columns, unnest_rows

log = logging.getLogger(__name__)

SCHEMA = "capture"
PARTNER_MESSAGE_NAMESPACE = uuid.UUID("0d7a3c61-52e4-4b8f-a0a3-9f1b6e2c8d47")
DEAD_LETTER_KEEP = 8 * 1024  # bytes of the raw value kept in a dead letter (with size and hash)

MIGRATIONS: list[Migration] = [
    BUS_TABLES,
    (
        2,
        """
        CREATE TABLE partners (
            partner_id text PRIMARY KEY,
            secret text NOT NULL,
            previous_secret text,
            previous_valid_until timestamptz,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        4,
        """
        CREATE TABLE registration (
            registration_id uuid PRIMARY KEY,
            company_key text NOT NULL,
            partner_id text NOT NULL,
            lead_id uuid NOT NULL,
            registered_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            status text NOT NULL,
            conflicts integer NOT NULL DEFAULT 0,
            version integer NOT NULL
        );
        CREATE INDEX registration_company ON registration (company_key, status, expires_at);
        CREATE INDEX registration_partner ON registration (partner_id);
        """,
    ),
    (
        5,
        """
        -- One partner holds a company at a time, whatever replicas race: the loser's whole
        -- transaction fails and is decided again, seeing the holder.
        CREATE UNIQUE INDEX registration_held_once ON registration (company_key)
            WHERE status = 'held';
        """,
    ),
    (
        3,
        """
        CREATE TABLE lead_key (
            rule text NOT NULL,
            key text NOT NULL,
            lead_id uuid NOT NULL,
            partner_id text,
            captured_at timestamptz NOT NULL,
            PRIMARY KEY (rule, key, lead_id)
        );
        """,
    ),
    (
        6,
        """
        -- Each lead's contact is sealed with a key of its own; forgetting destroys the key.
        CREATE TABLE subject_key (
            lead_id uuid PRIMARY KEY,
            key bytea NOT NULL
        );
        -- The secret of the keyed hashes that e-mail and phone are matched by.
        CREATE TABLE capture_secret (
            name text PRIMARY KEY,
            value bytea NOT NULL
        );
        """,
    ),
    event_store(7, "capture"),
    (
        8,
        """
        -- The deals of captured leads as pipeline tells them (opportunity.events.v1): a lead
        -- is merged only into a customer whose deal is still open (SPEC §3); a customer whose
        -- deal was won or lost comes back as a new lead, and a new deal.
        CREATE TABLE customer_deal (
            opportunity_id uuid PRIMARY KEY,
            lead_id uuid,
            open boolean NOT NULL,
            version integer NOT NULL
        );
        CREATE INDEX customer_deal_closed ON customer_deal (lead_id) WHERE NOT open;
        """,
    ),
    (
        9,
        """
        -- A key that leads to no open customer is claimed by the lead that makes it one, with
        -- the next number: two leads that both found it free (two posts of one form at once,
        -- one customer's leads on two replicas) claim the same number, and the second's whole
        -- transaction fails and is decided again, finding the first (`Customers`).
        ALTER TABLE lead_key ADD COLUMN claim integer;
        CREATE UNIQUE INDEX lead_key_claim ON lead_key (rule, key, claim)
            WHERE claim IS NOT NULL;
        """,
    ),
    (
        10,
        """
        -- Each partner lead: its customer, and the lead its reply named (its own, or the
        -- partner's first lead of that customer). The same customer from the same partner
        -- again is a `duplicate` of the partner's first lead, whoever brought the customer
        -- first (a web form, another partner); a message sent again is answered as it was.
        CREATE TABLE partner_lead (
            lead_id uuid PRIMARY KEY,
            customer uuid NOT NULL,
            partner_id text NOT NULL,
            answered uuid NOT NULL
        );
        CREATE INDEX partner_lead_first ON partner_lead (customer, partner_id)
            WHERE lead_id = answered;
        """,
    ),
]
HASHED_RULES = ("email", "phone")


class CaptureApp(EventStoreApp):
    name = "Capture"

    def __init__(self, dsn: str, schema: str, pool_size: int = 5) -> None:
        super().__init__(dsn, schema, pool_size)
        self.secret = self._matching_secret()

    def _matching_secret(self) -> bytes:
        """The keyed hashes' secret, made once per store (the first replica to ask makes it)."""
        table = self.table("capture_secret")
        if not self.query("SELECT to_regclass(%s) IS NOT NULL AS here",
                          [f"{self.schema}.capture_secret"])[0]["here"]:  # fmt: skip
            return b""  # not migrated yet (the event tables are made before the service's own)
        datastore: Any = getattr(self.recorder, "datastore")  # noqa: B009
        with datastore.transaction(commit=True) as cursor:
            cursor.execute(
                SQL("INSERT INTO {} (name, value) VALUES ('matching', %s) ON CONFLICT DO NOTHING"
                    ).format(table), [new_key()],
            )  # fmt: skip
            cursor.execute(SQL("SELECT value FROM {} WHERE name = 'matching'").format(table))
            return bytes(cursor.fetchone()["value"])

    # -- reading: a sealed contact is opened with its key, or shown erased ------------------

    def subject_keys(self, lead_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bytes | None]:
        found: dict[uuid.UUID, bytes | None] = dict.fromkeys(lead_ids)
        if lead_ids:
            rows = self.query(
                SQL("SELECT lead_id, key FROM {} WHERE lead_id = ANY(%b::uuid[])").format(
                    self.table("subject_key")),
                [list(lead_ids)],
            )  # fmt: skip
            found.update({r["lead_id"]: bytes(r["key"]) for r in rows})
        return found

    def to_events(
        self, notifications: Sequence[StoredEvent]
    ) -> list[DomainEventProtocol[uuid.UUID]]:
        """Sealed contacts opened with their keys (one query for the page), or shown erased."""
        events = super().to_events(notifications)
        sealed = [
            e for e in events
            if isinstance(e, Lead.Captured) and is_sealed(e.payload.get("contact"))
        ]  # fmt: skip
        keys = self.subject_keys([e.originator_id for e in sealed])
        for event in sealed:
            event.payload["contact"] = unseal(keys[event.originator_id], event.payload["contact"])
        return events

    def forget(self, lead_id: uuid.UUID, now: datetime) -> bool:
        """Erase a lead's contact: destroy its key and its matching keys, and record the
        erasure as an event, in one transaction. False when it was forgotten before;
        LookupError when no lead has that id."""
        lead = self._lead(lead_id)
        if lead.forgotten:
            return False
        contact = unseal(self.subject_keys([lead_id])[lead_id], lead.details["contact"])
        company = lead.details["company"]
        keys = [self.stored_key(k) for k in match_keys(contact.get("email"), contact.get("phone"),
                company.get("name"), company.get("region")) if k[0] in HASHED_RULES]  # fmt: skip
        lead.forget(now)
        writes: list[SideWrite] = [
            (SQL("DELETE FROM {} WHERE lead_id = %s").format(self.table("subject_key")),
             [(lead_id,)]),
            (SQL("DELETE FROM {} WHERE rule = %s AND key = %s").format(self.table("lead_key")),
             keys),
        ]  # fmt: skip
        self.record([lead], side_writes=writes)
        return True

    def unmerge(self, lead_id: uuid.UUID, actor: str, now: datetime,
                note: str | None = None) -> uuid.UUID:  # fmt: skip
        """Undo a lead's merge (SPEC §3): `LeadUnmerged`, and the lead indexed by its own keys
        as a customer of its own, in one transaction. Returns the lead it was merged into;
        LookupError when no lead has that id, NotMerged when it is not merged."""
        for _attempt in range(3):
            try:
                return self._unmerge(lead_id, actor, now, note)
            except IntegrityError:  # unmerged meanwhile by another request: read it again
                continue
        raise RuntimeError(f"lead {lead_id}: could not unmerge after 3 attempts")

    def _unmerge(self, lead_id: uuid.UUID, actor: str, now: datetime,
                 note: str | None) -> uuid.UUID:  # fmt: skip
        lead = self._lead(lead_id)
        merged_into = lead.merged_into
        lead.unmerge(actor, now, note)
        # Its keys from its contact in clear (a forgotten contact has none left to match by).
        contact = unseal(self.subject_keys([lead_id])[lead_id], lead.details["contact"])
        company = lead.details["company"]
        lead.match_keys = match_keys(contact.get("email"), contact.get("phone"),
                                     company.get("name"), company.get("region"))  # fmt: skip
        assert merged_into is not None
        # The keys this lead brought to the customer (written with its own time and partner)
        # lead to it from now on; the keys the customer had before stay the customer's.
        own = [(*self.stored_key(k), merged_into, lead.details["captured_at"],
                lead.details.get("partner_id")) for k in lead.match_keys]  # fmt: skip
        moved = SQL(
            "DELETE FROM {} WHERE rule = %s AND key = %s AND lead_id = %s AND captured_at = %s"
            " AND partner_id IS NOT DISTINCT FROM %s"
        ).format(self.table("lead_key"))
        if lead.details.get("partner_id") is not None:  # the partner's first of its own customer
            lead.answered = lead.id
        self.record([lead], side_writes=[(moved, own), *self.key_writes([lead]),
                                         *self.partner_writes([lead])])  # fmt: skip
        return merged_into

    def first_answers(self, leads: Sequence[tuple[uuid.UUID, str]]) -> dict[uuid.UUID, uuid.UUID]:
        """For partner messages sent again, (lead, partner) each: the lead id the first reply
        named, as stored with the lead (its own since an unmerge). For a lead stored before
        that was kept: its own, or its customer's if that was this partner's lead."""
        if not leads:
            return {}
        rows = self.query(
            SQL("SELECT lead_id, answered FROM {} WHERE lead_id = ANY(%b::uuid[])").format(
                self.table("partner_lead")
            ),
            [[lead for lead, _ in leads]],
        )
        answers = {uuid.UUID(str(r["lead_id"])): uuid.UUID(str(r["answered"])) for r in rows}
        older = [(lead, partner) for lead, partner in leads if lead not in answers]
        roots: dict[uuid.UUID, uuid.UUID | None] = {}
        for lead_id, events in self.events_of([lead for lead, _ in older]).items():
            root = None
            for event in events:
                if isinstance(event, Lead.Merged):
                    root = uuid.UUID(event.payload["into_lead_id"])
                elif isinstance(event, Lead.Unmerged):
                    root = None
            roots[lead_id] = root
        customers = self.events_of([r for r in set(roots.values()) if r is not None])
        partner_of_root = {r: events[0].payload.get("partner_id")  # type: ignore[attr-defined]
                           for r, events in customers.items() if events}  # fmt: skip
        for lead, partner in older:
            root = roots.get(lead)
            answers[lead] = (
                root if root is not None and partner_of_root.get(root) == partner else lead
            )
        return answers

    def _lead(self, lead_id: uuid.UUID) -> Lead:
        try:
            lead = self.repository.get(lead_id)
        except AggregateNotFoundError:
            lead = None
        if not isinstance(lead, Lead):  # nothing stored under it, or a registration's id
            raise LookupError(f"no lead {lead_id}")
        return lead

    def capture_web_lead(self, form: WebFormLead, now: datetime, correlation_id: str) -> uuid.UUID:
        """Store a web-form lead (merged into a known customer it matches); durable when this
        returns."""
        lead_id = uuid.uuid4()
        keys = match_keys(form.contact.email, form.contact.phone, form.company.name,
                          form.company.region)  # fmt: skip
        for _attempt in range(3):
            customers = self.known_customers(keys)
            lead = Lead.capture(
                lead_id,
                form,
                source=form.channel.value,
                channel=form.channel.value,
                captured_at=now,
                correlation_id=correlation_id,
                causation_id=correlation_id,
                duplicate_of=customers.first_match(keys),
                contact_key=new_key(),
                keys=keys,
            )
            customers.take(lead)
            try:
                self.record([lead], side_writes=self.key_writes([lead]))
                return lead_id
            except IntegrityError:  # a lead of the same customer claimed a key first: look again
                continue
        raise RuntimeError(f"lead {lead_id}: its keys were claimed meanwhile 3 times over")

    def known_customers(self, keys: Sequence[tuple[str, str]]) -> Customers:
        """The first lead each key belongs to whose deal is open (or not opened yet), and each
        key's newest claim: one query for a whole batch (keys in clear; the table holds e-mail
        and phone as keyed hashes)."""
        if not keys:
            return Customers({}, {})
        stored = {self.stored_key(k): k for k in keys}
        keys = list(stored)
        rows = self.query(
            # One probe of the primary key's index per key: a batch's lookups cost the same
            # however many leads are known. As a join, it was planned as a hash join over the
            # whole table: 29-32 ms for a batch of 500 messages (~1,500 keys) at 45,000 keys
            # stored, growing with the table (8.5 ms at 15,000); 4.9 ms this way. The first
            # open customer and the newest claim come from the one scan of the key's rows (a
            # probe each, of two indexes, took twice as long: 18.9 against 9.8 ms here).
            # A customer whose deal was won or lost is not matched: its next lead is a new one.
            SQL(
                "SELECT wanted.rule, wanted.key, k.lead_id, k.partner_id, k.claim"
                " FROM unnest(%b::text[], %b::text[]) AS wanted(rule, key)"
                " CROSS JOIN LATERAL (SELECT"
                " (array_agg(y.lead_id ORDER BY y.captured_at, y.lead_id)"
                " FILTER (WHERE y.open))[1] AS lead_id,"
                " (array_agg(y.partner_id ORDER BY y.captured_at, y.lead_id)"
                " FILTER (WHERE y.open))[1] AS partner_id,"
                " max(y.claim) AS claim"
                " FROM (SELECT x.lead_id, x.partner_id, x.captured_at, x.claim, NOT EXISTS"
                " (SELECT 1 FROM {deals} d WHERE d.lead_id = x.lead_id AND NOT d.open) AS open"
                " FROM {keys} x WHERE x.rule = wanted.rule AND x.key = wanted.key) y) k"
                " WHERE k.lead_id IS NOT NULL OR k.claim IS NOT NULL"
            ).format(keys=self.table("lead_key"), deals=self.table("customer_deal")),
            [[rule for rule, _ in keys], [key for _, key in keys]],
        )
        return Customers(
            {
                stored[(r["rule"], r["key"])]: Match(
                    uuid.UUID(str(r["lead_id"])), r["partner_id"], r["rule"]
                )
                for r in rows
                if r["lead_id"] is not None
            },
            {stored[(r["rule"], r["key"])]: r["claim"] for r in rows if r["claim"] is not None},
        )

    def stored_key(self, key: tuple[str, str]) -> tuple[str, str]:
        """A matching key as stored: e-mail and phone only as keyed hashes."""
        rule, value = key
        return (rule, keyed_hash(self.secret, value)) if rule in HASHED_RULES else key

    def key_writes(self, aggregates: Sequence[Aggregate]) -> list[SideWrite]:
        """Index new leads by their keys; a merged lead's keys lead to the customer's first lead
        (so a later match finds the customer, not a chain of duplicates), with the claims they
        make (`Customers.take`). A sealed contact's key is stored with it."""
        rows = []
        sealed: list[tuple[uuid.UUID, bytes]] = []
        for lead in aggregates:
            if isinstance(lead, Lead):
                root = lead.merged_into or lead.id
                partner = lead.details.get("partner_id")
                at = lead.details["captured_at"]
                rows += [(*self.stored_key(k), root, partner, at, lead.claims.get(k))
                         for k in lead.keys()]  # fmt: skip
                if lead.contact_key is not None:
                    sealed.append((lead.id, lead.contact_key))
        # A key already written for the customer is left as it is; a claim taken meanwhile
        # by another lead is not: it fails the transaction (lead_key_claim).
        statement = SQL(
            "INSERT INTO {} (rule, key, lead_id, partner_id, captured_at, claim) "
            + unnest_rows(("text", "text", "uuid", "text", "timestamptz", "int4"))
            + " ON CONFLICT (rule, key, lead_id) DO NOTHING"
        ).format(self.table("lead_key"))
        keys = SQL("INSERT INTO {} (lead_id, key) " + unnest_rows(("uuid", "bytea"))).format(
            self.table("subject_key")
        )
        return [(statement, as_columns(rows)), (keys, as_columns(sealed))]

    def handle_partner_messages(
        self,
        tracking_name: str,
        messages: Sequence[Incoming],
        secrets_of: Mapping[str, list[str]],
        now: datetime,
        rules: Rules,
    ) -> int:
        """Judge and answer a partition's batch of partner messages, exactly once each."""
        names = {m.partition: tracking_name for m in messages}
        return self.handle_partner_fetch(names, messages, secrets_of, now, rules)

    def handle_partner_fetch(
        self,
        tracking_names: Mapping[int, str],
        messages: Sequence[Incoming],
        secrets_of: Mapping[str, list[str]],
        now: datetime,
        rules: Rules,
        refresh: Callable[[], Mapping[str, list[str]]] | None = None,
    ) -> int:
        """Judge and answer partner messages from one or more partitions (each partition's
        position tracked under its name in `tracking_names`), exactly once each, in the order
        given (the consumer's `in_arrival_order`), which decides who registered a company
        first. Messages refused for their partner's secrets are judged again on the secrets
        `refresh` reads afresh, if given (the cache of `secrets_of` may be seconds old)."""
        answered: list[tuple[Incoming, Verdict, PartnerReply | None]] = []
        judged = {(m.partition, m.offset): judge(m, secrets_of, rules.max_message_bytes)
                  for m in messages}  # fmt: skip
        if refresh is not None and any(v.refused_on_secrets for v in judged.values()):
            fresh = refresh()
            for m in messages:
                if judged[m.partition, m.offset].refused_on_secrets:
                    judged[m.partition, m.offset] = judge(m, fresh, rules.max_message_bytes)

        def decide(batch: list[Incoming]) -> list[Aggregate]:
            answered.clear()  # decide runs again when a concurrent writer won a race
            verdicts = [(m, judged[m.partition, m.offset]) for m in batch]
            leads = [v for _, v in verdicts if v.lead is not None and v.lead_id is not None]
            intake = _BatchIntake(self, leads, now, rules)
            answered.extend((m, v, intake.take(m, v)) for m, v in verdicts)
            answers = [
                _answer(tracking_names[m.partition], m, v, reply, now) for m, v, reply in answered
            ]
            return [*intake.stored, *answers, *intake.registrations.values()]

        positioned = [(tracking_names[m.partition], m.offset + 1, m) for m in messages]
        applied = record_tracked(self, positioned, decide, self.side_writes)
        # Stored: what each partner is told. Refusals at INFO; the usual answers (the bulk of a
        # batch) at DEBUG, their log records built only when DEBUG is on.
        # (Nothing applied: another replica stored them all, whatever an earlier decide said.)
        every = log.isEnabledFor(logging.DEBUG)
        for message, verdict, reply in answered if applied else []:
            status = reply.status.value if reply is not None else "dead-letter"
            usual = status in ("accepted", "duplicate")
            if every or not usual:
                log.log(
                    logging.DEBUG if usual else logging.INFO,
                    "partner message answered",
                    extra={"correlation_id": verdict.message_id or _position(message),
                           "partner_id": verdict.partner_id, "status": status},
                )  # fmt: skip
        return applied

    def side_writes(self, aggregates: Sequence[Aggregate]) -> list[SideWrite]:
        return [*self.key_writes(aggregates), *self.partner_writes(aggregates),
                *self.registration_writes(aggregates)]  # fmt: skip

    def partner_writes(self, aggregates: Sequence[Aggregate]) -> list[SideWrite]:
        """Partner leads with their customer and the lead their reply named (an unmerged one
        anew: its own customer's first)."""
        rows = [(lead.id, lead.merged_into or lead.id, lead.details["partner_id"], lead.answered)
                for lead in aggregates
                if isinstance(lead, Lead) and lead.answered is not None]  # fmt: skip
        statement = SQL(
            "INSERT INTO {} (lead_id, customer, partner_id, answered) "
            + unnest_rows(("uuid", "uuid", "text", "uuid"))
            + " ON CONFLICT (lead_id) DO UPDATE SET customer = EXCLUDED.customer,"
            " answered = EXCLUDED.answered"
        ).format(self.table("partner_lead"))  # fmt: skip
        return [(statement, as_columns(rows))]

    def partner_leads(
        self, pairs: Sequence[tuple[uuid.UUID, str]]
    ) -> dict[tuple[uuid.UUID, str], uuid.UUID]:
        """For (customer, partner) pairs: the partner's first lead of that customer."""
        if not pairs:
            return {}
        rows = self.query(
            SQL(
                "SELECT p.customer, p.partner_id, p.lead_id FROM {} p"
                " JOIN unnest(%b::uuid[], %b::text[]) AS wanted(customer, partner_id)"
                " USING (customer, partner_id) WHERE p.lead_id = p.answered"
            ).format(self.table("partner_lead")),
            [[c for c, _ in pairs], [p for _, p in pairs]],
        )
        return {(uuid.UUID(str(r["customer"])), r["partner_id"]): uuid.UUID(str(r["lead_id"]))
                for r in rows}  # fmt: skip

    def registration_writes(self, aggregates: Sequence[Aggregate]) -> list[SideWrite]:
        registrations = [r for r in aggregates if isinstance(r, Registration)]
        registrations.sort(key=lambda r: r.status == "held")  # release before a new hold
        rows = [
            (r.id, r.company_key, r.partner_id, r.lead_id, r.registered_at, r.expires_at,
             r.status, r.conflicts, r.version)
            for r in registrations
        ]  # fmt: skip
        # One statement for the batch's registrations (each once: they are aggregates), in the
        # order given: the one-hold-per-company index is checked row by row as they are written.
        types = ("uuid", "text", "text", "uuid", "timestamptz", "timestamptz", "text", "int4",
                 "int4")  # fmt: skip
        statement = SQL(
            "INSERT INTO {table} (registration_id, company_key, partner_id, lead_id,"
            " registered_at, expires_at, status, conflicts, version) "
            + unnest_rows(types)
            + " ON CONFLICT (registration_id) DO UPDATE"
            " SET status = EXCLUDED.status, conflicts = EXCLUDED.conflicts,"
            " version = EXCLUDED.version WHERE {table}.version < EXCLUDED.version"
        ).format(table=self.table("registration"))
        return [(statement, as_columns(rows))]

    def held_registrations(self, companies: set[str], now: datetime) -> dict[str, Registration]:
        """Registrations still marked held for these companies (some may be past their end:
        the caller expires those before anyone registers anew)."""
        if not companies:
            return {}
        rows = self.query(
            SQL(
                "SELECT registration_id FROM {} WHERE company_key = ANY(%b::text[])"
                " AND status = 'held'"
            ).format(self.table("registration")),
            [sorted(companies)],
        )
        held = [self.repository.get(row["registration_id"]) for row in rows]
        return {r.company_key: r for r in held if isinstance(r, Registration)}

    def expire_registrations(self, now: datetime, limit: int = 500) -> list[uuid.UUID]:
        """Registrations past their end as of `now` expire: an event each."""
        rows = self.query(
            SQL(
                "SELECT registration_id FROM {} WHERE status = 'held' AND expires_at <= %s"
                " ORDER BY expires_at LIMIT %s"
            ).format(self.table("registration")),
            [now, limit],
        )
        expired = []
        for row in rows:
            registration = self.repository.get(row["registration_id"])
            if isinstance(registration, Registration):
                registration.expire(now)
                expired.append(registration)
        if expired:
            self.record(expired, side_writes=self.registration_writes(expired))
        return [r.id for r in expired]

    def registrations_of(self, partner_id: str) -> list[dict[str, object]]:
        return self.query(
            SQL(
                "SELECT registration_id, company_key, lead_id, registered_at, expires_at, status,"
                " conflicts FROM {} WHERE partner_id = %s ORDER BY registered_at DESC LIMIT 1000"
            ).format(self.table("registration")),
            [partner_id],
        )


class _BatchIntake:
    """One batch of valid partner leads against what the store knows: messages seen before,
    known customers (dedupe) and held registrations (报备), each looked up once per batch and
    kept current as the batch goes, so two messages of one batch see each other."""

    def __init__(self, app: CaptureApp, leads: list[Verdict], now: datetime, rules: Rules) -> None:
        self.now, self.rules = now, rules
        self.seen = app.existing_ids([v.lead_id for v in leads if v.lead_id])
        # Lead -> the lead id its first reply named: for messages sent again (stored before, or
        # earlier in this batch), which are answered with it again.
        self.answered = app.first_answers([(v.lead_id, v.partner_id or "") for v in leads
                                           if v.lead_id in self.seen])  # fmt: skip
        self.keys: dict[uuid.UUID, list[tuple[str, str]]] = {}
        partners: dict[uuid.UUID, str] = {}
        for v in leads:
            assert v.lead is not None and v.lead_id is not None
            partners[v.lead_id] = v.partner_id or ""
            contact, company = v.lead.contact, v.lead.company
            self.keys[v.lead_id] = match_keys(contact.email, contact.phone, company.name,
                                              company.region)  # fmt: skip
        self.customers = app.known_customers(sorted({k for ks in self.keys.values() for k in ks}))
        # The lead each partner has of the customers its leads match, kept current as the
        # batch goes (a partner's second lead of a customer in one batch is a duplicate too).
        matches = {(lead, m) for lead in partners
                   if (m := self.customers.first_match(self.keys[lead]))}  # fmt: skip
        self.partner_leads = app.partner_leads(sorted({(m.lead_id, partners[lead])
                                                       for lead, m in matches}))  # fmt: skip
        # A customer stored before partner_lead was kept: the partner has its first lead if
        # that lead was the partner's own (the customer's events say; rarely read).
        older = {m.lead_id for lead, m in matches if m.partner_id == partners[lead]
                 and (m.lead_id, partners[lead]) not in self.partner_leads}  # fmt: skip
        for root, events in app.events_of(sorted(older)).items():
            if events and (partner := events[0].payload.get("partner_id")):  # type: ignore[attr-defined]
                self.partner_leads.setdefault((root, partner), root)
        companies = {dict(ks).get("company_region") for ks in self.keys.values()}
        self.held = app.held_registrations({c for c in companies if c}, now)
        self.registrations: dict[uuid.UUID, Registration] = {}
        for company, registration in list(self.held.items()):
            if not registration.holds(now):  # past its end, not yet marked: expire it now
                registration.expire(now)
                self.registrations[registration.id] = registration
                del self.held[company]
        self.stored: list[Lead] = []

    def take(self, message: Incoming, verdict: Verdict) -> PartnerReply | None:
        if verdict.lead is None or verdict.lead_id is None:
            return verdict.reply
        lead_in, partner = verdict.lead, verdict.partner_id or ""
        if verdict.lead_id in self.seen:  # the same message again: the lead it was answered with
            answered = self.answered.get(verdict.lead_id, verdict.lead_id)
            return PartnerReply(message_id=lead_in.message_id, status=ReplyStatus.duplicate,
                                lead_id=answered)  # fmt: skip
        self.seen.add(verdict.lead_id)
        keys = self.keys[verdict.lead_id]
        match = self.customers.first_match(keys)
        # The lead this partner has of the customer already, if any.
        first = self.partner_leads.get((match.lead_id, partner)) if match is not None else None
        lead = Lead.capture(
            verdict.lead_id, lead_in, source="partner", captured_at=self.now,
            correlation_id=lead_in.message_id, causation_id=_position(message),
            partner_id=partner, message_id=verdict.message_id, duplicate_of=match,
            contact_key=new_key(), keys=keys,
        )  # fmt: skip
        self.stored.append(lead)
        self.customers.take(lead)  # later leads of this batch know this customer now
        # The same customer from the same partner: stored and merged, and answered with the
        # lead that partner already has.
        lead_id = lead.answered = first or verdict.lead_id
        status = ReplyStatus.accepted if first is None else ReplyStatus.duplicate
        self.partner_leads.setdefault((lead.merged_into or lead.id, partner), lead_id)
        self.answered[verdict.lead_id] = lead_id
        company = dict(keys).get("company_region")
        holder = self.held.get(company) if company else None
        if holder is not None and holder.partner_id != partner:
            holder.conflict(partner, verdict.lead_id, self.now, lead_in.message_id)
            self.registrations[holder.id] = holder
            status = ReplyStatus.conflict
        elif holder is None and company is not None:
            # The first partner to submit the company holds it: a lead merged as the same
            # customer (by e-mail, say) but of a company nobody holds registers it all the same.
            days = self.rules.registration_days
            holder = Registration.register(
                partner, lead_in, verdict.lead_id, company, self.now, days, lead_in.message_id
            )
            self.held[company] = self.registrations[holder.id] = holder
        return PartnerReply(message_id=lead_in.message_id, status=status, lead_id=lead_id,
                            registration=_registration_view(holder, partner))  # fmt: skip


def _registration_view(holder: Registration | None, partner: str) -> RegistrationView | None:
    if holder is None:
        return None
    if holder.partner_id == partner:
        return RegistrationView(
            status=RegistrationStatus.registered,
            registered_at=holder.registered_at,
            expires_at=holder.expires_at,
        )
    return RegistrationView(
        status=RegistrationStatus.held_by_other_partner, expires_at=holder.expires_at
    )


@dataclass
class Customers:
    """What the store knows of some matching keys (`CaptureApp.known_customers`): the open
    customer each leads to, and each key's newest claim; kept current by `take` as a batch's
    leads are captured, so that a later lead of the batch finds an earlier one."""

    matches: dict[tuple[str, str], Match]
    claimed: dict[tuple[str, str], int]

    def first_match(self, keys: Sequence[tuple[str, str]]) -> Match | None:
        """The first rule (e-mail, phone, company in region) that finds a known customer."""
        for key in keys:
            if key in self.matches:
                return self.matches[key]
        return None

    def take(self, lead: Lead) -> None:
        """A lead just captured: each of its keys that leads to no open customer is claimed
        for the lead's customer, with the key's next number (`lead.claims`, written with its
        keys); from now on all its keys lead to that customer."""
        root, partner = lead.merged_into or lead.id, lead.details.get("partner_id")
        for key in lead.keys():
            if key not in self.matches:
                lead.claims[key] = self.claimed[key] = self.claimed.get(key, 0) + 1
                self.matches[key] = Match(root, partner, key[0])


def _position(message: Incoming) -> str:
    return f"{message.topic}/{message.partition}/{message.offset}"


def _answer(
    tracking_name: str,
    message: Incoming,
    verdict: Verdict,
    reply: PartnerReply | None,
    now: datetime,
) -> PartnerMessage:
    dead_letter = None
    if verdict.dead_letter_reason is not None:
        dead_letter = DeadLetter(
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            reason=verdict.dead_letter_reason,
            partner_id=verdict.partner_id,
            message_id=verdict.message_id,
            errors=list(verdict.errors),
            received_at=now,
            value_bytes=len(message.value),
            value_sha256=hashlib.sha256(message.value).hexdigest(),
            value_b64=base64.b64encode(message.value[:DEAD_LETTER_KEEP]).decode(),
        ).model_dump(mode="json")
    correlation = verdict.message_id or _position(message)
    return PartnerMessage._create(
        PartnerMessage.Handled,
        # One answer per message: a replica replaying the same offsets collides here.
        id=uuid.uuid5(PARTNER_MESSAGE_NAMESPACE, f"{tracking_name}/{message.offset}"),
        timestamp=now,
        partner_id=verdict.partner_id if reply is not None else None,
        reply=None if reply is None else reply.model_dump(mode="json", exclude_none=True),
        dead_letter=dead_letter,
        correlation_id=correlation,
        causation_id=_position(message),
    )
