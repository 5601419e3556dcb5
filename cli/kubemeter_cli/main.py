"""``kubemeter <role> ...``: one image, one command, one subcommand per role.

Each role lives in its own module and is imported only when chosen, so ``kubemeter agent`` never
loads the operator (and kopf) and ``kubemeter operator`` never loads NVML.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# role -> (module, callable taking argv, one-line help)
ROLES: dict[str, tuple[str, str, str]] = {
    "operator": ("kubemeter_operator.main", "run", "reconcile Meters, Collectors and Pipelines (Deployment)"),
    "agent": ("kubemeter.agent", "run", "meter the pods of one node into usage events (DaemonSet)"),
    "gateway": (
        "kubemeter.gateway.main",
        "main",
        "buffer events on the volume and deliver them (StatefulSet)",
    ),
    "sink": (
        "kubemeter.sink.main",
        "main",
        "a local billing API: OpenMeter/Flexprice/Lago ingest, usage queries",
    ),
    "dlq": ("kubemeter.output.dead_letters", "main", "list, replay or purge events the billing API refused"),
    "report": ("kubemeter.report.main", "main", "chargeback report from a kubemeter sink or OpenMeter"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print("usage: kubemeter <role> [options]\n\nroles:")
        for role, (_, _, summary) in sorted(ROLES.items()):
            print(f"  {role:<10} {summary}")
        return 0 if args else 2
    role, rest = args[0], args[1:]
    if role not in ROLES:
        print(f"kubemeter: unknown role {role!r}; choose one of: {', '.join(sorted(ROLES))}", file=sys.stderr)
        return 2
    module_name, function_name, _ = ROLES[role]
    entry = getattr(importlib.import_module(module_name), function_name)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
