"""The command-latency benchmark alone (`make bench-latency`, or
`python -m tests.perf.latency [rate] [seconds]`): the pipeline service as its own process on a
fresh embedded stack, stage commands over HTTP at a fixed rate, events read back from Kafka."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from shared.devstack import DevStack, free_port
from shared.settings import Settings
from tests.perf.pipeline_bench import bench_command_latency
from tests.perf.runs import remove_databases


async def main(rate: float, seconds: float) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="dealstream-latency-"))
    stack = DevStack(Settings(data_dir=data_dir, kafka_port=free_port()))
    await asyncio.to_thread(stack.start)
    try:
        latency = await bench_command_latency(stack.child_settings(), rate, seconds)
    finally:
        await asyncio.to_thread(stack.stop)
    await asyncio.to_thread(remove_databases, data_dir)  # kept when the run failed; logs stay
    print(json.dumps(latency, indent=2))
    print(
        f"\n{latency['name']}: p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms"
        f" ({latency['received']}/{latency['commands']} events seen,"
        f" {latency['accepted']} accepted, {latency['achieved_rate']:.0f} commands/s sent)"
    )
    return 0


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:3]]
    sys.exit(asyncio.run(main(*(args + [200.0, 10.0][len(args) :]))))
