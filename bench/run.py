"""``make bench``: every benchmark in one run, side by side, printed as a table and written to
``bench/results/latest.json``.

The suites are a registry: :func:`suites` lists ``bench/yardsticks.py`` and ``bench/accuracy.py``
first, then every ``bench/bench_*.py`` in name order. A suite is a module with ``ABOUT`` (one line:
what it measures) and ``run() -> list[dict]`` returning figures ``{name, value, unit, baseline}``;
adding a file is all it takes to join ``make bench`` (``--only NAME`` runs some, and replaces only
their suites' entries and figures in an existing output: the others stay, each suite with the time it
ran). Every figure names
its baseline: a goal, ground truth, a yardstick or the peer's figure measured in the same run. This
machine is shared and noisy, so read ratios measured side by side, not absolute numbers.
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

BENCH_DIR = Path(__file__).resolve().parent
FIRST = ["bench.yardsticks", "bench.accuracy"]


def suites() -> list[str]:
    """The suite modules in the order they run: the yardsticks first, then ``bench_*`` by name."""
    found = sorted(f"bench.{path.stem}" for path in BENCH_DIR.glob("bench_*.py"))
    return FIRST + found


# figure -> yardstick it is a fraction of
# Fractions of a yardstick measured alongside, in the same suite (a yardstick from another suite ran
# minutes apart on a noisy machine). Gateway ingest has its own per-round ratio in the output suite
# (output/gateway-ingest-fraction-of-sqlite).
FRACTIONS_OF = {
    "output/drain-to-local-sink": "output/yardstick-sqlite-same-work",
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
                    "suite": by_name[name].get("suite"),
                }
            )


def merge(previous: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """``report`` of a partial run laid over the ``previous`` output: the suites it ran, and their
    figures, replace the old ones; every other suite and figure stays as it was measured. Figures
    written before they named their suite are matched by group (``agent/...``)."""
    ran = {s["suite"] for s in report["suites"]}
    groups = {f["name"].split("/", 1)[0] for f in report["figures"]}

    def stays(figure: dict[str, Any]) -> bool:
        if "suite" in figure:
            return figure["suite"] not in ran
        return figure["name"].split("/", 1)[0] not in groups

    kept = [{"ran_at": previous["ran_at"], **s} for s in previous["suites"] if s["suite"] not in ran]
    return {
        **report,
        "suites": kept + report["suites"],
        "figures": [f for f in previous["figures"] if stays(f)] + report["figures"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--only", action="append", default=[], help="module name suffix to run (repeatable)")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)

    figures: list[dict[str, Any]] = []
    ran: list[dict[str, Any]] = []
    for module_name in suites():
        if args.only and not any(module_name.endswith(only) for only in args.only):
            continue
        started = time.perf_counter()
        module = importlib.import_module(module_name)
        about = str(getattr(module, "ABOUT", ""))
        print(f"-- {module_name}: {about}", flush=True)
        suite_started_at = datetime.now(tz=UTC).isoformat()
        try:
            produced = module.run()
            status = "ok"
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            produced, status = [], "failed"
        figures += [{**figure, "suite": module_name} for figure in produced]
        seconds = round(time.perf_counter() - started, 1)
        ran.append(
            {
                "suite": module_name,
                "about": about,
                "status": status,
                "seconds": seconds,
                "ran_at": suite_started_at,
            }
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
        "suites": ran,
        "figures": figures,
    }
    if args.only and args.output.exists():
        report = merge(json.loads(args.output.read_text()), report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmachine: {report['machine']}\nwrote {args.output}")
    return 1 if any(s["status"] == "failed" for s in ran) else 0


if __name__ == "__main__":
    raise SystemExit(main())
