"""The billing API specs the tests validate against are in the repository, unmodified, with the
provenance and licence its README records (a fresh clone needs nothing beside it)."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from tests.support.billing_specs import SPEC_DIR, spec_validators

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_every_vendored_file_matches_the_checksum_its_readme_records() -> None:
    readme = (SPEC_DIR / "README.md").read_text()
    recorded = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, re.MULTILINE))
    on_disk = {
        p.relative_to(SPEC_DIR).as_posix()
        for p in SPEC_DIR.rglob("*")
        if p.is_file() and p.name != "README.md"
    }
    assert set(recorded) == on_disk
    for name, digest in recorded.items():
        assert hashlib.sha256((SPEC_DIR / name).read_bytes()).hexdigest() == digest, name


def test_every_vendored_spec_ships_with_its_licence() -> None:
    readme = (SPEC_DIR / "README.md").read_text()
    licensed = dict(re.findall(r"^\| `(licenses/[^`]+)` \| `([^`]+)` \|", readme, re.MULTILINE))
    specs = {p.name for p in SPEC_DIR.iterdir() if p.is_file() and p.name != "README.md"}
    assert sorted(licensed.values()) == sorted(specs)
    for licence in licensed:
        assert "License" in (SPEC_DIR / licence).read_text()[:2000], licence


def test_the_specs_load_from_inside_the_repository() -> None:
    assert SPEC_DIR.is_relative_to(REPO_ROOT)
    validators = spec_validators()
    assert validators.openmeter_batch.problems([{"specversion": "1.0"}])
    assert validators.lago_batch.problems({"events": "not a list"})


def test_no_file_of_the_repository_reads_a_shared_folder_beside_the_clone() -> None:
    # A fresh clone has nothing beside it: what the tests need is vendored (above).
    outside = re.compile(rb"\.\./" + rb"shared\b|" + rb"shared/" + rb"reference")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    readers = [
        name.decode()
        for name in tracked
        if name
        and (REPO_ROOT / name.decode()).is_file()
        and outside.search((REPO_ROOT / name.decode()).read_bytes())
    ]
    assert readers == []
