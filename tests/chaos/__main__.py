"""`python -m tests.chaos [--seconds S] [--seed N] [--rate R] [--scale-out N]` (`make chaos`): the
crash and fault suite in full, on a stack of its own in a temporary folder (kept when a count is
not zero, for its logs); exits 1 on any loss or duplicate. With `--scale-out N` pipeline,
reporting and notify run as N replicas each and the faults are rebalances instead (a replica of
each added, later one of each killed: tests.chaos.faults.Rebalances), with the same counts."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from shared.devstack import DevStack
from tests.chaos.faults import SCALED, Faults, Rebalances
from tests.chaos.run import Plan, run_chaos
from tests.conftest import stack_settings
from tests.e2e.conftest import Services, cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=Plan.seconds, help="of load")
    parser.add_argument("--seed", type=int, default=Plan.seed, help="for what is killed when")
    parser.add_argument("--rate", type=float, default=Plan.rate, help="partner messages/s")
    parser.add_argument("--every", type=float, default=Plan.every, help="seconds between kills")
    parser.add_argument(
        "--scale-out",
        type=int,
        default=0,
        metavar="N",
        help="run the consumer services as N replicas; rebalances as the faults",
    )
    args = parser.parse_args()
    plan = Plan(seconds=args.seconds, seed=args.seed, rate=args.rate, every=args.every)
    folder = Path(tempfile.mkdtemp(prefix="dealstream-chaos-"))
    stack = DevStack(stack_settings(folder / "stack"))
    stack.start()
    (folder / "logs").mkdir()
    services = Services(stack, folder / "logs")
    try:
        cli(services.env, "migrate")
        services.start_all(dict.fromkeys(SCALED, max(1, args.scale_out)))
        services.wait_ready(within=120)
        kind = Rebalances if args.scale_out > 1 else Faults
        report = asyncio.run(run_chaos(stack, services, plan, kind))
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
