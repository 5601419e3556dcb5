"""The Dockerfile as data: its stages and instructions (continuation lines joined, comments dropped)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), " ".join(arguments.split())
        if keyword == "FROM":
            base, _, name = arguments.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            if not stages:
                raise ValueError(f"{keyword} before the first FROM")
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


def read_stages(path: Path) -> list[Stage]:
    return parse_dockerfile(path.read_text())


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD in JSON (exec) form; the shell form is refused (hadolint DL3025 agrees)."""
    value = json.loads(arguments)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected a JSON list of strings, got {arguments}")
    return value


def key_values(arguments: str) -> dict[str, str]:
    """``LABEL``/``ENV`` in key=value form (values may be double-quoted)."""
    import shlex

    pairs = {}
    for word in shlex.split(arguments):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {word!r} in {arguments!r}")
        pairs[key] = value
    return pairs
