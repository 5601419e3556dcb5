"""An agent's output in a process of its own: ``python -m tests.integration.output.spool_writer``.

Writes usage events through :class:`SpoolOutput` in batches, printing ``wrote <n>`` after each write
returns (the promise: committed), then waits to be killed.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from kubemeter.output.spool import SpoolOutput

from tests.integration.output.harness import FAST_POLICY, usage_events


async def run(args: argparse.Namespace) -> None:
    output = await SpoolOutput.open(
        args.spool_dir, args.gateway_url, max_bytes=64 * 2**20, policy=FAST_POLICY
    )
    await output.start()
    events = usage_events(args.count, prefix=args.prefix)
    for start in range(0, len(events), args.batch):
        await output.write(events[start : start + args.batch])
        print(f"wrote {start + len(events[start : start + args.batch])}", flush=True)
    await asyncio.Event().wait()  # until SIGKILL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spool-dir", type=Path, required=True)
    parser.add_argument("--gateway-url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--prefix", default="agent")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
