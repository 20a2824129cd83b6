"""`python -m tests.chaos [--seconds S] [--seed N] [--rate R]` (`make chaos`): the crash and
fault suite in full, on a stack of its own in a temporary folder (kept when a count is not
zero, for its logs); exits 1 on any loss or duplicate."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from shared.devstack import DevStack
from tests.chaos.run import Plan, run_chaos
from tests.conftest import stack_settings
from tests.e2e.conftest import SERVICES, Services, cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=Plan.seconds, help="of load")
    parser.add_argument("--seed", type=int, default=Plan.seed, help="for what is killed when")
    parser.add_argument("--rate", type=float, default=Plan.rate, help="partner messages/s")
    parser.add_argument("--every", type=float, default=Plan.every, help="seconds between kills")
    args = parser.parse_args()
    plan = Plan(seconds=args.seconds, seed=args.seed, rate=args.rate, every=args.every)
    folder = Path(tempfile.mkdtemp(prefix="dealstream-chaos-"))
    stack = DevStack(stack_settings(folder / "stack"))
    stack.start()
    (folder / "logs").mkdir()
    services = Services(stack, folder / "logs")
    try:
        cli(services.env, "migrate")
        for service in SERVICES:
            services.start(service)
        services.wait_ready()
        report = asyncio.run(run_chaos(stack, services, plan))
    finally:
        services.stop()
        stack.stop()
    if report.problems:
        print(f"logs and data kept in {folder}")
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
