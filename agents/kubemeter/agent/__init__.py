"""``kubemeter agent``: meters the pods of one node into usage events.

    kubemeter agent [--config /etc/kubemeter/config/agent.yaml] [--node-name NODE] [--kubeconfig FILE]

The node name comes from ``--node-name`` or ``$KUBEMETER_NODE_NAME`` (the operator sets it from the
downward API). Events go to the output seam (:mod:`kubemeter.output`), built by
``kubemeter.output.agent_output(config)``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kubemeter.api.rendered import AGENT_CONFIG_FILENAME, CONFIG_DIR, NODE_NAME_ENV, AgentConfig
from kubemeter.output import EventOutput


def default_output(config: AgentConfig) -> EventOutput:
    """The spool that forwards to the gateway, provided by :mod:`kubemeter.output`."""
    output_module = importlib.import_module("kubemeter.output")
    factory = getattr(output_module, "agent_output", None)
    if factory is None:
        raise SystemExit(
            "kubemeter agent: kubemeter.output has no agent_output(config) yet, so there is nowhere to "
            "write events; install a build that includes the spool/forwarder"
        )
    output: EventOutput = factory(config)
    return output


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubemeter agent", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path(CONFIG_DIR) / AGENT_CONFIG_FILENAME)
    parser.add_argument("--node-name", default=os.environ.get(NODE_NAME_ENV))
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None)
    parser.add_argument("--metrics-port", type=int, default=None, help="overrides metricsPort of the config")
    parser.add_argument(
        "--metrics-host", default="0.0.0.0", help="address for /healthz and /metrics (127.0.0.1 off-cluster)"
    )
    args = parser.parse_args(list(argv))
    if not args.node_name:
        parser.error(f"the node name is unknown; pass --node-name or set ${NODE_NAME_ENV}")
    return args


def run(argv: Sequence[str]) -> int:
    from kubemeter.agent.memory import limit_malloc_arenas, skip_unused_modules

    skip_unused_modules()
    from kubemeter.agent.runtime import Agent

    limit_malloc_arenas()

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    agent = Agent(
        args.config, args.node_name, default_output, args.kubeconfig, args.metrics_port, args.metrics_host
    )
    try:
        asyncio.run(agent.run())
    except KeyboardInterrupt:
        return 130
    return 0
