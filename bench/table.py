"""``bench/results/latest.json`` as the Markdown tables of docs/benchmarks.md, so the page carries
exactly what the last ``make bench`` measured: ``python -m bench.table [FILE]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.run import RESULTS


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    # A partial run (--only) keeps the other suites' entries: each says when it ran.
    suites = ", ".join(
        f"{s['suite'].removeprefix('bench.')} {s['status']} {s.get('seconds', 0):.0f} s"
        + (f" at {s['ran_at'][:16]}Z" if "ran_at" in s else "")
        for s in report["suites"]
    )
    lines = [
        f"Run `{report['ran_at'][:19]}Z`: {suites}. Machine: {machine['cpus']} CPUs "
        f"({machine['cpu_model']}), {machine['memory_gib']} GiB, {machine['platform']}, "
        f"Python {machine['python']}.",
        "",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for figure in report["figures"]:
        groups.setdefault(figure["name"].split("/", 1)[0], []).append(figure)
    for group, figures in groups.items():
        lines += [f"#### {group}", "", "| figure | value | unit | baseline |", "|---|---|---|---|"]
        for figure in figures:
            value = figure["value"]
            shown = f"{value:,}" if isinstance(value, int) else str(value)
            cells = [figure["name"], shown, str(figure["unit"]), str(figure.get("baseline"))]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "latest.json"
    print(markdown(json.loads(path.read_text())))
