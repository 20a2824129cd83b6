"""The one settings object: infrastructure from `DEALSTREAM_*` variables, business rules from
`dealstream.toml` (SPEC defaults when absent)."""

from __future__ import annotations

import json
import secrets
import ssl
import tomllib
from datetime import time
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

STAGES: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")


class StageRule(BaseModel):
    name: str
    name_zh: str
    probability: int = Field(ge=0, le=100)
    follow_up_days: int | None = Field(default=None, ge=1)


def _default_stages() -> dict[str, StageRule]:
    return {
        "A": StageRule(name="understand", name_zh="了解商机", probability=10, follow_up_days=3),
        "B": StageRule(name="confirm", name_zh="确认商机", probability=25, follow_up_days=5),
        "C": StageRule(name="solution", name_zh="方案论证", probability=50, follow_up_days=7),
        "D": StageRule(name="negotiation", name_zh="商务谈判", probability=75, follow_up_days=5),
        "E": StageRule(name="closing", name_zh="销售成交", probability=90, follow_up_days=3),
        "F": StageRule(name="handover", name_zh="交接回款", probability=100),
    }


class Tiers(BaseModel):
    """Upper bounds (exclusive, CNY) of the small, normal and important tiers. An amount in
    another currency is converted at `cny_per` (CNY to one unit of it: `USD = "7.10"`) first;
    one in a currency without a rate there is compared as it is."""

    small_below: Decimal = Decimal("20000")
    normal_below: Decimal = Decimal("50000")
    important_below: Decimal = Decimal("200000")
    cny_per: dict[Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")],
                  Annotated[Decimal, Field(gt=0)]] = Field(default_factory=dict)  # fmt: skip


Criterion = Literal["budget", "decision_maker", "proposal_amount"]
LOSS_REASONS = (
    "price",
    "competitor",
    "no_budget",
    "no_decision",
    "timing",
    "product_fit",
    "unresponsive",
    "other",
)


def _zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. Asia/Shanghai)") from None
    return name


Zone = Annotated[str, AfterValidator(_zone)]  # a reminder's and a digest's local time


class User(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    name: str = ""
    team: str | None = None
    role: Literal["rep", "manager", "branch_manager", "ops", "admin"] = "rep"
    email: str | None = None
    locale: Literal["en", "zh-CN"] = "zh-CN"
    timezone: Zone = "Asia/Shanghai"


class Team(BaseModel):
    id: str
    name: str = ""
    manager: str | None = None
    branch_manager: str | None = None
    timezone: Zone = "Asia/Shanghai"


class RoutingRule(BaseModel):
    """Leads matching every given field go to `team` (first matching rule wins)."""

    team: str
    region: str | None = None
    industry: str | None = None
    partner: str | None = None


class Routing(BaseModel):
    rules: list[RoutingRule] = Field(default_factory=list)
    default_team: str | None = None
    load_cap: int = Field(default=50, ge=1)


class Directory(BaseModel):
    users: list[User] = Field(default_factory=list)
    teams: list[Team] = Field(default_factory=list)

    def user(self, user_id: str | None) -> User | None:
        return next((u for u in self.users if u.id == user_id), None)

    def team(self, team_id: str | None) -> Team | None:
        return next((t for t in self.teams if t.id == team_id), None)

    def reps(self, team_id: str | None = None) -> list[User]:
        """The reps of a team; of every team without one."""
        return [u for u in self.users if u.role == "rep" and (team_id is None or u.team == team_id)]


class NotifyRules(BaseModel):
    """Reminder, escalation and digest rules of SPEC §5 (stage follow-up days live on the
    stages; `follow_up_days_by_tier` overrides them per tier, e.g. `major = {A = 1}`)."""

    escalate_after_days: int = Field(default=2, ge=0)
    follow_up_days_by_tier: dict[
        Literal["small", "normal", "important", "major"], dict[str, int]
    ] = Field(default_factory=dict)
    digest_weekday: int = Field(default=0, ge=0, le=6)  # Monday
    digest_time: time = time(9, 0)
    # A digest missed while notify was down still goes out this long after its time.
    digest_grace_hours: int = Field(default=24, ge=1, le=24 * 6)


class ReportingRules(BaseModel):
    """`[reporting]`: the calendar reports count days, weeks, months and quarters in (a month
    starts at local midnight on its first; the directory's teams default to the same zone)."""

    timezone: Zone = "Asia/Shanghai"


def _default_exit_criteria() -> dict[str, list[Criterion]]:
    return {"B": ["budget", "decision_maker"], "D": ["proposal_amount"]}


class Rules(BaseModel):
    """Business rules: the SPEC defaults, overridable in `dealstream.toml`."""

    stages: dict[str, StageRule] = Field(default_factory=_default_stages)
    tiers: Tiers = Field(default_factory=Tiers)
    exit_criteria: dict[str, list[Criterion]] = Field(default_factory=_default_exit_criteria)
    loss_reasons: list[str] = Field(default_factory=lambda: list(LOSS_REASONS))
    directory: Directory = Field(default_factory=Directory)
    routing: Routing = Field(default_factory=Routing)
    registration_days: int = Field(default=90, ge=1)
    stale_days: int = Field(default=30, ge=1)
    recycle_days: int = Field(default=60, ge=1)
    max_message_bytes: int = Field(default=64 * 1024, ge=1024)
    notify: NotifyRules = Field(default_factory=NotifyRules)
    reporting: ReportingRules = Field(default_factory=ReportingRules)

    @field_validator("stages", mode="before")
    @classmethod
    def _stages_over_defaults(cls, given: Any) -> Any:
        """A stage configured in `dealstream.toml` changes what it names, field by field; the
        stages it leaves out keep their defaults (every code must have its rule: a stage
        without one would fail each command and each lead that reaches it)."""
        if not isinstance(given, dict):
            return given
        unknown = sorted(set(given) - set(STAGES))
        if unknown:
            raise ValueError(f"no stage {', '.join(unknown)}: the stages are {', '.join(STAGES)}")
        stages: dict[str, Any] = {code: r.model_dump() for code, r in _default_stages().items()}
        for code, rule in given.items():
            if isinstance(rule, StageRule):
                rule = rule.model_dump(exclude_unset=True)
            stages[code] = {**stages[code], **rule} if isinstance(rule, dict) else rule
        return stages

    def probability(self, stage: str) -> int:
        return self.stages[stage].probability


class Settings(BaseSettings):
    """Infrastructure settings. With `kafka` / `database_url` unset, the embedded dev stack in
    `data_dir` is used (see shared.devstack)."""

    model_config = SettingsConfigDict(env_prefix="DEALSTREAM_", extra="ignore")

    kafka: str | None = None
    database_url: str | None = None
    data_dir: Path = Path(".dealstream")
    config_file: Path = Path("dealstream.toml")
    kafka_port: int = 9092
    capture_port: int = 8001
    pipeline_port: int = 8002
    notify_port: int = 8003
    reporting_port: int = 8004
    token_secret: str | None = None
    # Idempotent producers keep order within a partition across retries. On by default with a
    # configured (real) Kafka; the embedded Tansu broker refuses it (InitProducerId fails).
    kafka_idempotence: bool | None = None
    # A real cluster: SASL/SCRAM over TLS, say (the embedded broker speaks PLAINTEXT only).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: Path | None = None
    topic_partitions: int = 6
    topic_replication: int = 1
    # min.insync.replicas of the topics DealStream creates (2 with replication 3); unset: the
    # broker's default.
    topic_min_insync_replicas: int | None = None
    # OpenTelemetry tracing hooks (shared.tracing): off unless asked for and opentelemetry-api
    # is installed; spans go where an installed, configured OpenTelemetry SDK sends them.
    otel: bool = False
    relay_batch: int = 500
    # The outbox relay in a process of its own beside each service (shared.bus.relay_process);
    # off: in the service's process, on its event loop.
    relay_process: bool = True
    # Seconds a relay process may go without coming round its loop before it exits to be started
    # again (stuck in a call that never returns: shared.bus.relay_process).
    relay_stalled_s: float = Field(default=60.0, gt=0)
    consumer_batch: int = Field(default=500, ge=1)
    # Records per fetch of reporting's consumer: its per-batch statements (positions, funnel
    # sums) amortise over more events (2,000: 15% more events/s than 500, measured here).
    reporting_batch: int = Field(default=2000, ge=1)
    # Tansu completes a group join only after about half the session timeout: keep it short in
    # dev and tests, longer on a real cluster.
    consumer_session_timeout_ms: int = 10000
    # Bytes of a partition a consumer's fetch brings at most (aiokafka's default is 1 MiB; all
    # partitions together at most 16 MiB: shared.bus.kafka). Tansu holds the fetch that goes on
    # from where a size-cut one stopped for the whole fetch.max.wait.ms (500 ms) with records
    # there to read: capture's consumer stood still 0.35 s every 2,000 partner messages of a
    # backlog at 1 MiB; at 4 a fetch is cut every 4 MiB of it (messages/s of the capture bench,
    # interleaved: medians 1,867 at 1 MiB, 2,231 at 4). A shorter wait instead cost the loaded
    # system its batches: the end-to-end bench at 50 ms did 747 and 706 leads/s, against 835
    # and 802 at 500.
    consumer_partition_fetch_bytes: int = Field(default=4 << 20, ge=1024)
    log_level: str = "INFO"
    http_host: str = "127.0.0.1"
    recycle_tick_seconds: float = 600.0
    intake_rate_per_minute: int = 60  # web-form posts per client
    intake_burst: int = 20
    # notify: how often the scheduler fires due timers, and the delivery channels. E-mail is
    # sent only with an SMTP host; the webhook only with a URL; notification.events.v1 always.
    notify_tick_seconds: float = 30.0
    public_url: str = "http://127.0.0.1:8002"  # links in notifications point here
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "dealstream@localhost"
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    webhook_url: str | None = None
    webhook_secret: str | None = None
    delivery_attempts: int = Field(default=5, ge=1)
    delivery_backoff_seconds: float = Field(default=1.0, ge=0)
    # A claimed delivery's lease: renewed before each attempt, taken over by another replica
    # once it runs out (its holder crashed), so each attempt must end well within it.
    delivery_lease_seconds: float = Field(default=120.0, gt=0)

    def stack_file(self) -> Path:
        return self.data_dir / "stack.json"

    def bootstrap_servers(self) -> str:
        if self.kafka:
            return self.kafka
        return f"127.0.0.1:{self.kafka_port}"

    def kafka_security(self) -> dict[str, Any]:
        """The connection options every client of DealStream's gets (aiokafka's names)."""
        options: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = ssl.create_default_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
            )
        if self.kafka_security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password
        return options

    def idempotent_producer(self) -> bool:
        if self.kafka_idempotence is not None:
            return self.kafka_idempotence
        return self.kafka is not None

    def dsn(self) -> str:
        """The PostgreSQL URL: the configured one, or the one the running dev stack wrote."""
        if self.database_url:
            return self.database_url
        stack = self.stack_file()
        if stack.exists():
            return str(json.loads(stack.read_text())["database_url"])
        raise RuntimeError(
            "no database: set DEALSTREAM_DATABASE_URL, or start the embedded stack with "
            f"`dealstream dev` (it writes {stack})"
        )

    def secret_for_tokens(self) -> str:
        if self.token_secret:
            return self.token_secret
        path = self.data_dir / "token-secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def rules(self) -> Rules:
        return load_rules(self.config_file)


@lru_cache(maxsize=8)
def _load_rules_cached(path: str, mtime: float) -> Rules:
    return rules_of(tomllib.loads(Path(path).read_text(encoding="utf-8")))


def rules_of(data: dict[str, Any]) -> Rules:
    """The rules of a parsed `dealstream.toml`: `[rules]`, and its top-level `[directory]`,
    `[routing]`, `[notify]` and `[reporting]` sections."""
    rules = dict(data.get("rules", {}))
    for section in ("directory", "routing", "notify", "reporting"):
        if section in data:
            rules[section] = data[section]
    return Rules.model_validate(rules)


def load_rules(path: Path) -> Rules:
    if not path.exists():
        return Rules()
    return _load_rules_cached(str(path.resolve()), path.stat().st_mtime)
