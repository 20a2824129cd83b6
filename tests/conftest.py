"""Session fixtures: the same devstack as `make run` (embedded PostgreSQL and Tansu), on free
ports and in a temporary folder, so `make test` runs beside a running `make run`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.devstack import DevStack, free_port
from shared.settings import Settings

os.environ.setdefault("DEALSTREAM_TOKEN_SECRET", "test-token-secret-" + uuid.uuid4().hex)


def stack_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        kafka_port=free_port(),
        consumer_session_timeout_ms=3000,
        config_file=data_dir / "dealstream.toml",
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    devstack = DevStack(stack_settings(tmp_path_factory.mktemp("stack")))
    devstack.start()
    try:
        yield devstack
    finally:
        devstack.stop()


@pytest.fixture(scope="session")
def settings(stack: DevStack) -> Settings:
    return stack.child_settings()
