"""End-to-end fixtures: the four services as real processes (the way `dealstream dev` and a
production deployment run them) against a stack of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.devstack import DevStack, free_port
from tests.conftest import stack_settings

SERVICES = ("capture", "pipeline", "notify", "reporting")


class Services:
    """The four services as processes; each can be killed and restarted, and any of them run as
    more replicas (`add`: `pipeline-2`, `pipeline-3`, ... each on a port of its own, in the same
    consumer groups as the first)."""

    def __init__(self, stack: DevStack, logs: Path) -> None:
        self.stack = stack
        self.logs = logs
        self.ports = {name: free_port() for name in SERVICES}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            **stack.env(),
            "DEALSTREAM_DATA_DIR": str(stack.settings.data_dir),
            "DEALSTREAM_CONFIG_FILE": str(stack.settings.config_file),
            "DEALSTREAM_CONSUMER_SESSION_TIMEOUT_MS": "3000",
            **{f"DEALSTREAM_{n.upper()}_PORT": str(p) for n, p in self.ports.items()},
        }

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def start(self, name: str) -> None:
        """Start `name`: a service (its first replica) or a replica `add` named."""
        service = service_of(name)
        port = self.ports.setdefault(name, free_port())
        log = (self.logs / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            env={**self.env, f"DEALSTREAM_{service.upper()}_PORT": str(port)},
            stdout=log,
            stderr=log,
        )

    def start_all(self, replicas: dict[str, int] | None = None) -> None:
        """Start the four services, with `replicas` of some (service -> how many)."""
        for service in SERVICES:
            self.start(service)
        for service, n in (replicas or {}).items():
            for _ in range(n - 1):
                self.add(service)

    def add(self, service: str) -> str:
        """Start one more replica of `service`; its name."""
        n = 2
        while f"{service}-{n}" in self.ports:
            n += 1
        self.start(name := f"{service}-{n}")
        return name

    def replicas(self, service: str) -> list[str]:
        """The running replicas of `service`, the first one first."""
        return [name for name in self.processes if service_of(name) == service]

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def wait_ready(self, *names: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        for service in names or list(self.processes):
            while True:
                try:
                    if httpx.get(f"{self.url(service)}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{service} not ready; see {self.logs / service}.log")
                time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


def service_of(name: str) -> str:
    """`pipeline-2` -> `pipeline`."""
    return name.split("-")[0]


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run the `dealstream` command as a subprocess, the way an operator does."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def partner_secret(added: str) -> str:
    """The secret `dealstream partner add` printed."""
    return added.split("secret: ")[1].split()[0]


@pytest.fixture(scope="module")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    devstack = DevStack(stack_settings(tmp_path_factory.mktemp("e2e")))
    devstack.start()
    try:
        yield devstack
    finally:
        devstack.stop()


@pytest.fixture(scope="module")
def services(e2e_stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    running = Services(e2e_stack, tmp_path_factory.mktemp("logs"))
    cli(running.env, "migrate")
    running.start_all()
    running.wait_ready()
    try:
        yield running
    finally:
        running.stop()
