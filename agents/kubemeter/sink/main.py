"""``kubemeter sink``: run the local billing API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from kubemeter.gateway.limits import add_limit_arguments, limits_from, make_runner, start_site
from kubemeter.output.credentials import SecretFile
from kubemeter.sink.app import SinkApp
from kubemeter.sink.specs import load_spec_validators
from kubemeter.sink.store import UsageStore

log = logging.getLogger("kubemeter.sink")


async def serve(args: argparse.Namespace) -> None:
    store = await UsageStore.open(args.data_dir / "usage.db")
    validators = load_spec_validators(args.spec_dir) if args.spec_dir else None
    token = SecretFile(args.token_file) if args.token_file else None
    sink = SinkApp(
        store,
        token=token,
        validators=validators,
        lago_max_batch_events=args.lago_max_batch_events,
        faults_enabled=args.enable_faults,
        limits=limits_from(args),
    )
    runner = make_runner(sink.build(), sink.guard.limits)
    await runner.setup()
    listener = await start_site(runner, sink.guard, args.host, args.port)
    log.info(
        "local billing API on %s:%d (spec validation %s, auth %s, fault injection %s)",
        args.host,
        args.port,
        "on" if validators else "off",
        "on" if token else "off",
        "on" if args.enable_faults else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        await runner.cleanup()
        await listener.wait_closed()
        await store.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubemeter sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless given)")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/kubemeter-sink"))
    parser.add_argument("--token-file", type=Path, help="accepted API key(s), one per line; no auth if unset")
    parser.add_argument(
        "--spec-dir", type=Path, help="folder with the billing API specs to validate requests"
    )
    parser.add_argument(
        "--enable-faults",
        action="store_true",
        help="serve /_sink/faults (injected answers for tests; needs the token when --token-file is set)",
    )
    parser.add_argument("--lago-max-batch-events", type=int, default=100, help="LAGO_EVENTS_BATCH_MAX_LENGTH")
    add_limit_arguments(parser)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0
