"""``make bench``: every benchmark in one run, side by side, printed as a table and written to
``bench/results/latest.json``.

Each module listed in :data:`SUITES` has ``run() -> list[dict]`` returning figures
``{name, value, unit, baseline}``. Yardsticks run first so kubemeter's throughput can be stated as
a fraction of what this disk and this loopback do at all; this machine is shared and noisy, so read
ratios measured in the same run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# module, what it measures
SUITES: list[tuple[str, str]] = [
    ("bench.yardsticks", "physical yardsticks: fsync, batched SQLite insert, loopback HTTP"),
    ("bench.accuracy", "allocation accuracy against the OpenMeter-collector and OpenCost methods"),
    ("bench.bench_output", "gateway ingest, ack latency, drain, disk bytes per event"),
    ("bench.bench_agent", "agent CPU and RSS at 110 and 500 pods per node"),
    ("bench.bench_operator", "operator convergence and RSS"),
    ("bench.bench_peer", "a peer pipeline (Bento or Redpanda Connect) on the same sink"),
]

# figure -> yardstick it is a fraction of
# Fractions of a yardstick measured alongside, in the same suite (a yardstick from another suite ran
# minutes apart on a noisy machine). Gateway ingest has its own per-round ratio in the output suite
# (output/gateway-ingest-fraction-of-sqlite).
FRACTIONS_OF = {
    "output/drain-to-local-sink": "output/yardstick-sqlite-batched-insert",
}


def machine() -> dict[str, Any]:
    memory_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except FileNotFoundError:
        pass
    model = ""
    with contextlib.suppress(FileNotFoundError, StopIteration):
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def add_fractions(figures: list[dict[str, Any]]) -> None:
    by_name = {f["name"]: f for f in figures}
    for name, yardstick in FRACTIONS_OF.items():
        if name in by_name and yardstick in by_name and by_name[yardstick]["value"]:
            figures.append(
                {
                    "name": f"{name}/fraction-of-yardstick",
                    "value": round(by_name[name]["value"] / by_name[yardstick]["value"], 3),
                    "unit": "ratio",
                    "baseline": yardstick,
                }
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--only", action="append", default=[], help="module name suffix to run (repeatable)")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)

    figures: list[dict[str, Any]] = []
    suites: list[dict[str, Any]] = []
    for module_name, about in SUITES:
        if args.only and not any(module_name.endswith(only) for only in args.only):
            continue
        started = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            suites.append({"suite": module_name, "status": "not built yet", "about": about})
            print(f"-- {module_name}: not built yet ({about})")
            continue
        print(f"-- {module_name}: {about}", flush=True)
        try:
            produced = module.run()
            status = "ok"
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            produced, status = [], "failed"
        figures += produced
        suites.append(
            {"suite": module_name, "status": status, "seconds": round(time.perf_counter() - started, 1)}
        )

    add_fractions(figures)
    width = max((len(f["name"]) for f in figures), default=10)
    print()
    print(f"{'figure':<{width}}  {'value':>14}  unit  (baseline)")
    for figure in figures:
        baseline = f"  ({figure['baseline']})" if figure.get("baseline") else ""
        print(f"{figure['name']:<{width}}  {figure['value']:>14}  {figure['unit']}{baseline}")
    report = {
        "ran_at": datetime.now(tz=UTC).isoformat(),
        "machine": machine(),
        "suites": suites,
        "figures": figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmachine: {report['machine']}\nwrote {args.output}")
    return 1 if any(s["status"] == "failed" for s in suites) else 0


if __name__ == "__main__":
    raise SystemExit(main())
