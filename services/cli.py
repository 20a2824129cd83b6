"""The `dealstream` command (SPEC §7)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from shared.clock import from_iso
from shared.settings import Settings

SERVICES = ("capture", "pipeline", "notify", "reporting")


def _port(settings: Settings, service: str) -> int:
    return int(getattr(settings, f"{service}_port"))


def _aware_time(text: str) -> datetime:
    at = from_iso(text)
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2027-01-31T09:00:00Z")
    return at


def cmd_tick(args: argparse.Namespace) -> int:
    """Run a service's due work as of --now: capture expires registrations, pipeline recycles
    idle opportunities. What the service's own scheduler does, on demand."""
    from services.capture.app import MIGRATIONS as CAPTURE
    from services.capture.app import CaptureApp
    from services.pipeline.app import MIGRATIONS as PIPELINE
    from services.pipeline.app import PipelineApp
    from shared.runtime import drain, open_schema

    settings = Settings()
    schema = args.command
    if schema == "notify":
        return asyncio.run(_notify_tick(settings, args.now))
    steps, make, verb = {
        "capture": (CAPTURE, CaptureApp, "registrations expired"),
        "pipeline": (PIPELINE, PipelineApp, "opportunities recycled"),
    }[schema]

    async def migrated() -> None:
        pool = await open_schema(settings, schema, steps)
        await pool.close()

    asyncio.run(migrated())
    app = make(settings.dsn(), schema, 2)
    due = (
        (lambda: app.expire_registrations(args.now))
        if isinstance(app, CaptureApp)
        else (lambda: app.recycle_idle(args.now, settings.rules()))
    )
    try:
        done = drain(due)
        for item in done:
            print(f"{verb.split()[1]} {item}")
        print(f"{len(done)} {verb} as of {args.now.isoformat()}")
    finally:
        app.close()
    return 0


async def _notify_tick(settings: Settings, now: datetime) -> int:
    """Notify's due work as of `now`: due timers and digests issued, pending deliveries sent."""
    from services.notify.app import Notifier
    from services.notify.timers import MIGRATIONS, SCHEMA
    from shared.bus.kafka import make_producer
    from shared.clock import FixedClock
    from shared.runtime import open_schema

    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        done = await Notifier(pool, settings, producer, "notify-tick").tick(FixedClock(now))
    finally:
        await producer.stop()
        await pool.close()
    print(" ".join(f"{name}={count}" for name, count in done.items()), f"as of {now.isoformat()}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Rebuild reporting's read models from the event stores; --verify compares instead of
    swapping (exit 1 when a row differs). Prints a JSON summary; progress goes to stderr."""
    from services.reporting.replay import replay

    done = asyncio.run(replay(Settings(), args.verify))
    print(json.dumps(done, indent=2, ensure_ascii=False))
    return 1 if args.verify and not done["verified"] else 0


def _pipeline_store(settings: Settings) -> Any:
    from services.pipeline.app import MIGRATIONS, PipelineApp
    from shared.runtime import open_schema

    async def migrated() -> None:
        await (await open_schema(settings, "pipeline", MIGRATIONS)).close()

    asyncio.run(migrated())
    return PipelineApp(settings.dsn(), "pipeline", 2)


def cmd_audit(args: argparse.Namespace) -> int:
    """`audit lost`: every lost deal with its timeline and findings; `audit show`: one
    opportunity as at a moment."""
    from services.pipeline import audit
    from shared.contracts.common import jsonable

    settings = Settings()
    app = _pipeline_store(settings)
    try:
        if args.action == "show":
            shown = audit.audit_show(app, args.opportunity_id, args.as_of)
            print(json.dumps(shown, indent=2, ensure_ascii=False))
            return 0
        report = audit.audit_lost(app, settings.rules(), args.since, args.until, args.reason,
                                  args.team)  # fmt: skip
    finally:
        app.close()
    if args.format == "json":
        print(json.dumps(jsonable(report), indent=2, ensure_ascii=False))
    elif args.format == "csv":
        sys.stdout.write(audit.as_csv(report))
    else:
        print(audit.as_table(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The raw history as JSON lines, one v1 envelope per event, in store order: the events of
    the bus contract (what sales systems see), not the stores' own records (capture's handled
    partner messages, which hold replies and dead letters, stay inside)."""
    from services.capture.app import CaptureApp
    from shared.bus.envelopes import envelope_of
    from shared.contracts.events import EVENT_TYPES

    settings = Settings()
    stores = {"pipeline": lambda: _pipeline_store(settings),
              "capture": lambda: CaptureApp(settings.dsn(), "capture", 2)}  # fmt: skip
    count = 0
    for name in ("capture", "pipeline") if args.store == "all" else (args.store,):
        app = stores[name]()
        try:
            position = 0
            while notifications := app.notifications_after(position, 2000):
                position = notifications[-1].id
                if args.stream:
                    notifications = [n for n in notifications if n.originator_id == args.stream]
                for event in app.to_events(notifications):
                    if getattr(event, "public_name", "") not in EVENT_TYPES:
                        continue
                    envelope = envelope_of(event)
                    if args.since and envelope.occurred_at < args.since:
                        continue
                    sys.stdout.write(envelope.model_dump_json() + "\n")
                    count += 1
        finally:
            app.close()
    print(f"{count} events", file=sys.stderr)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase a lead's contact data (SPEC §8): its key is destroyed; the erasure is an event."""
    from services.capture.app import MIGRATIONS, CaptureApp
    from shared.clock import SystemClock
    from shared.runtime import open_schema

    settings = Settings()

    async def migrated() -> None:
        await (await open_schema(settings, "capture", MIGRATIONS)).close()

    asyncio.run(migrated())
    app = CaptureApp(settings.dsn(), "capture", 2)
    try:
        done = app.forget(args.lead_id, SystemClock().now())
    except LookupError as exc:
        print(f"dealstream forget: {exc}", file=sys.stderr)
        return 2
    finally:
        app.close()
    print(f"lead {args.lead_id}: contact " + ("erased" if done else "was erased before"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Load a year of demo data into the running system (see services/demo.py)."""
    from services.demo import main as demo

    return demo(Settings(), args.weeks, args.per_week)


def cmd_service(args: argparse.Namespace) -> int:
    import importlib

    from shared.runtime import run_service

    module = importlib.import_module(f"services.{args.command}.__main__")
    run_service(module.main(Settings()))
    return 0


async def _migrate_all(settings: Settings) -> dict[str, int]:
    from services.capture.app import MIGRATIONS as CAPTURE
    from services.notify.timers import MIGRATIONS as NOTIFY
    from services.pipeline.app import MIGRATIONS as PIPELINE
    from services.reporting.projection import MIGRATIONS as REPORTING
    from shared.runtime import open_schema

    versions = {}
    for schema, steps in (
        ("capture", CAPTURE),
        ("pipeline", PIPELINE),
        ("notify", NOTIFY),
        ("reporting", REPORTING),
    ):
        pool = await open_schema(settings, schema, steps)
        versions[schema] = int(await pool.fetchval("SELECT max(version) FROM schema_version"))
        await pool.close()
    return versions


def cmd_migrate(_: argparse.Namespace) -> int:
    for schema, version in asyncio.run(_migrate_all(Settings())).items():
        print(f"{schema}: schema version {version}")
    return 0


async def _partner(args: argparse.Namespace) -> int:
    from services.capture.access import access_commands
    from services.capture.app import MIGRATIONS, SCHEMA
    from services.capture.partners import PartnerExists, add_partner, list_partners, rotate_partner
    from shared.bus.kafka import create_topics
    from shared.clock import SystemClock
    from shared.contracts.topics import PARTNER_LEADS, partner_replies
    from shared.runtime import open_schema

    settings = Settings()
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    try:
        if args.action == "add":
            topic = partner_replies(args.partner_id)
            try:
                secret = await add_partner(pool, args.partner_id, args.secret)
            except PartnerExists as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            await create_topics(settings, [topic])
            print(f"partner {args.partner_id} added; replies on {topic}")
            print(f"secret: {secret}")
            print(
                "\nOn a Kafka cluster with SASL/SCRAM and ACLs, give the partner a user that may"
                f" write {PARTNER_LEADS} and read only {topic}:"
            )
            for command in access_commands(args.partner_id, settings.bootstrap_servers(),
                                           settings.kafka_sasl_mechanism):  # fmt: skip
                print(f"  {command}")
        elif args.action == "rotate":
            try:
                secret = await rotate_partner(pool, args.partner_id, SystemClock().now())
            except KeyError:
                print(f"error: no partner {args.partner_id}", file=sys.stderr)
                return 1
            print(f"partner {args.partner_id}: new secret (the old one stays valid 7 days)")
            print(f"secret: {secret}")
        else:
            for row in await list_partners(pool):
                print(f"{row['partner_id']}\tadded {row['created_at']:%Y-%m-%d}")
        return 0
    finally:
        await pool.close()


def cmd_partner(args: argparse.Namespace) -> int:
    return asyncio.run(_partner(args))


ASYNCAPI_FILE = Path("docs/asyncapi.json")
ASYNCAPI_LOCK = Path("docs/asyncapi.lock.json")


def cmd_asyncapi(args: argparse.Namespace) -> int:
    """Print the bus contract; with --write, update docs/ — refusing to change what a released
    contracts version already said (bump CONTRACTS_VERSION in shared/contracts/asyncapi.py)."""
    from shared.contracts.asyncapi import CONTRACTS_VERSION, canonical, document, fingerprint

    doc = document()
    if not args.write:
        print(canonical(doc), end="")
        return 0
    lock = json.loads(ASYNCAPI_LOCK.read_text()) if ASYNCAPI_LOCK.exists() else {}
    released = lock.get(CONTRACTS_VERSION)
    if released is not None and released != fingerprint(doc):
        print(
            f"error: the contracts changed but version {CONTRACTS_VERSION} is released; "
            "bump CONTRACTS_VERSION in shared/contracts/asyncapi.py",
            file=sys.stderr,
        )
        return 1
    lock[CONTRACTS_VERSION] = fingerprint(doc)
    ASYNCAPI_FILE.parent.mkdir(parents=True, exist_ok=True)
    ASYNCAPI_FILE.write_text(canonical(doc))
    ASYNCAPI_LOCK.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    print(f"wrote {ASYNCAPI_FILE} (contracts {CONTRACTS_VERSION})")
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    """`dealstream user add`: a user appended to the directory in dealstream.toml."""
    from pydantic import ValidationError

    from shared.directory_file import DirectoryError, add_user
    from shared.settings import User

    fields = {"id": args.user_id, "name": args.name, "team": args.team, "role": args.role,
              "email": args.email, "locale": args.locale, "timezone": args.timezone}  # fmt: skip
    try:
        user = User.model_validate({k: v for k, v in fields.items() if v is not None})
        print(add_user(Settings().config_file, user, args.manager))
    except ValidationError as exc:
        for error in exc.errors():
            print(f"dealstream user add: {'.'.join(map(str, error['loc']))}: {error['msg']}",
                  file=sys.stderr)  # fmt: skip
        return 2
    except DirectoryError as exc:
        print(f"dealstream user add: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from shared.auth import Principal, Role, issue_token
    from shared.clock import SystemClock

    settings = Settings()
    principal = Principal(role=Role(args.role), user=args.user, team=args.team)
    token = issue_token(
        principal, settings.secret_for_tokens(), SystemClock().now(), timedelta(days=args.ttl_days)
    )
    print(token)
    return 0


def _wait_ready(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def cmd_dev(_: argparse.Namespace) -> int:
    from shared.devstack import DevStack, PortInUse

    settings = Settings()
    started = time.monotonic()
    for service in SERVICES:
        from shared.devstack import port_is_free

        if not port_is_free(_port(settings, service)):
            print(
                f"error: port {_port(settings, service)} for {service} is taken "
                f"(set DEALSTREAM_{service.upper()}_PORT)",
                file=sys.stderr,
            )
            return 2
    stack = DevStack(settings)
    try:
        stack.start()
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, **stack.env()}
    env.setdefault("DEALSTREAM_CONSUMER_SESSION_TIMEOUT_MS", "4000")
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print(f"postgres: {stack.database_url}\nkafka:    {stack.kafka}", flush=True)
        asyncio.run(_migrate_all(stack.child_settings()))
        for service in SERVICES:
            children[service] = _spawn(service, env)
        deadline = time.monotonic() + 90
        for service in SERVICES:
            port = _port(settings, service)
            if not _wait_ready(port, deadline):
                print(f"error: {service} did not become ready on port {port}", file=sys.stderr)
                return 1
            print(f"{service:<10} http://127.0.0.1:{port}  ready", flush=True)
        print(
            f"DealStream is up in {time.monotonic() - started:.1f}s. "
            "Load a year of demo data: `.venv/bin/dealstream demo` (then open"
            f" http://127.0.0.1:{settings.reporting_port}/ with a token from `dealstream token"
            " issue --role ops --user me`). Add a partner: `dealstream partner add acme`."
            " Ctrl-C stops everything.",
            flush=True,
        )
        while not stopping:
            time.sleep(0.5)
            for service, child in list(children.items()):
                if child.poll() is not None and not stopping:
                    print(f"{service} exited ({child.returncode}); restarting", file=sys.stderr)
                    children[service] = _spawn(service, env)
        return 0
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        for child in children.values():
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        stack.stop()
        print("stopped", flush=True)


def _spawn(service: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches `dev`, which stops the services in order.
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{service}"], env=env, start_new_session=True
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="dealstream", description="DealStream operations")
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "dev", help="start embedded PostgreSQL, broker and all services"
    ).set_defaults(run=cmd_dev)
    for service in SERVICES:
        runner = commands.add_parser(service, help=f"run the {service} service")
        runner.set_defaults(run=cmd_service)
        if service in ("pipeline", "capture", "notify"):
            actions = runner.add_subparsers(dest="action")
            what = {
                "pipeline": "recycle opportunities idle",
                "capture": "expire registrations",
                "notify": "issue due reminders, escalations and digests and deliver them",
            }
            tick = actions.add_parser("tick", help=f"{what[service]} as of --now")
            tick.add_argument("--now", required=True, type=_aware_time, help="ISO-8601 time")
            tick.set_defaults(run=cmd_tick)
    commands.add_parser("migrate", help="apply schema migrations").set_defaults(run=cmd_migrate)
    forget = commands.add_parser("forget", help="erase a lead's contact data (PIPL/GDPR)")
    forget.add_argument("lead_id", type=uuid.UUID)
    forget.set_defaults(run=cmd_forget)
    demo = commands.add_parser("demo", help="load a year of demo data into the running system")
    demo.add_argument("--weeks", type=int, default=52, help="how far back it starts")
    demo.add_argument("--per-week", type=int, default=12, help="leads a week")
    demo.set_defaults(run=cmd_demo)
    audit = commands.add_parser("audit", help="audit lost deals; any opportunity at any time")
    audits = audit.add_subparsers(dest="action", required=True)
    lost = audits.add_parser("lost", help="every lost deal with its timeline and findings")
    lost.add_argument("--since", type=_aware_time, help="lost at or after (ISO-8601)")
    lost.add_argument("--until", type=_aware_time, help="lost before (ISO-8601)")
    lost.add_argument("--reason", help="a loss reason code")
    lost.add_argument("--team")
    lost.add_argument("--format", choices=["table", "json", "csv"], default="table")
    show = audits.add_parser("show", help="one opportunity's state and history as at a moment")
    show.add_argument("opportunity_id", type=uuid.UUID)
    show.add_argument("--as-of", type=_aware_time, help="ISO-8601 time; default now")
    audit.set_defaults(run=cmd_audit)
    export = commands.add_parser("export", help="the raw event history for other tools")
    export.add_argument("what", choices=["events"])
    export.add_argument("--store", choices=["all", "capture", "pipeline"], default="all")
    export.add_argument("--stream", type=uuid.UUID, help="one lead's or opportunity's events")
    export.add_argument("--since", type=_aware_time, help="events at or after (ISO-8601)")
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.set_defaults(run=cmd_export)
    replay = commands.add_parser("replay", help="rebuild read models from the event stores")
    replay.add_argument("target", choices=["reporting"])
    replay.add_argument(
        "--verify",
        action="store_true",
        help="compare the rebuild with the live tables; report every difference",
    )
    replay.set_defaults(run=cmd_replay)

    partner = commands.add_parser("partner", help="manage channel partners")
    actions = partner.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a partner and print its secret")
    add.add_argument("partner_id")
    add.add_argument("--secret", help="use this secret instead of a generated one")
    actions.add_parser("list", help="list partners")
    rotate = actions.add_parser("rotate", help="issue a new secret; the old one stays valid 7 days")
    rotate.add_argument("partner_id")
    partner.set_defaults(run=cmd_partner)

    asyncapi = commands.add_parser("asyncapi", help="print the bus contract (AsyncAPI 3.0)")
    asyncapi.add_argument("--write", action="store_true", help="update docs/asyncapi.json")
    asyncapi.set_defaults(run=cmd_asyncapi)

    user = commands.add_parser("user", help="the directory of users and teams (dealstream.toml)")
    user_actions = user.add_subparsers(dest="action", required=True)
    add_user = user_actions.add_parser("add", help="add a user to the directory")
    add_user.add_argument("user_id")
    add_user.add_argument("--name")
    add_user.add_argument("--team", help="the user's team (added to the directory if new)")
    add_user.add_argument("--role", choices=["rep", "manager", "branch_manager", "ops", "admin"])
    add_user.add_argument("--manager", help="the team's manager (of a team new to the directory)")
    add_user.add_argument("--email")
    add_user.add_argument("--locale", choices=["en", "zh-CN"])
    add_user.add_argument("--timezone", help="an IANA zone, e.g. Asia/Shanghai")
    user.set_defaults(run=cmd_user)

    token = commands.add_parser("token", help="bearer tokens for the HTTP APIs")
    token_actions = token.add_subparsers(dest="action", required=True)
    issue = token_actions.add_parser("issue", help="print a bearer token")
    issue.add_argument(
        "--role", required=True, choices=["rep", "manager", "ops", "admin", "partner"]
    )
    issue.add_argument("--user", required=True)
    issue.add_argument("--team")
    issue.add_argument("--ttl-days", type=int, default=30)
    token.set_defaults(run=cmd_token)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
