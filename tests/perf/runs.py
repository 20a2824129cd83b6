"""Repeated runs of a throughput benchmark: this machine is shared and noisy (the same run's CPU
seconds vary by half from one run to the next), so a rate is the median of `RUNS` runs, each on
a fresh broker and schema, and every run is kept in `bench-results.json` beside it. A baseline
runs once: at a tenth of the rate or less, its one run lasts 30-60 s, long enough to average
the machine's swings that a 2 s run of ours meets or misses."""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

RUNS = max(1, int(os.environ.get("BENCH_RUNS", "3")))


def schema_of(base: str, run: int) -> str:
    """A run's own schema (run 0: the base name, as a single run has always used)."""
    return f"{base}_{run}" if run else base


async def median_of(run: Callable[[int], Awaitable[float]], runs: int = RUNS) -> dict[str, Any]:
    """`run(n)` for n = 1..runs: the median rate, and every run's."""
    rates = [await run(n) for n in range(1, runs + 1)]
    return {"ours": statistics.median(rates), "ours_runs": [round(r, 1) for r in rates]}


def remove_databases(root: Path) -> None:
    """The PostgreSQL data directories a run made under `root` (gigabytes) removed; the logs,
    small, stay for a look at what the run did."""
    for marker in list(root.rglob("PG_VERSION")):
        if marker.parent.exists() and (marker.parent / "global").is_dir():  # a cluster, not a db
            shutil.rmtree(marker.parent, ignore_errors=True)
