"""docs/crd-reference.md is generated from crds/ and current: every field, its default and its rules."""

from __future__ import annotations

from pathlib import Path

from kubemeter_operator import docgen


def test_checked_in_reference_is_current() -> None:
    assert docgen.REFERENCE_PATH.read_text() == docgen.render(), (
        "docs/crd-reference.md is stale; run python -m kubemeter_operator.docgen"
    )


def test_every_spec_and_status_field_is_listed() -> None:
    page = docgen.render()
    for crd in docgen.load_crds():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for top in ("spec", "status"):
            for path, _, _ in docgen.fields(root["properties"][top]):
                assert f"| `{path}`" in page, f"{crd['spec']['names']['kind']}.{top}.{path} is missing"


def test_cel_rules_appear_with_their_messages() -> None:
    page = docgen.render()
    message = "spec.source: set exactly one of allocation, dra, idle, kubeletUsage, nvml, prometheus or runai"
    assert message in page
    assert "`kubectl get` shows: **Type**" in page


def test_check_mode_fails_on_a_stale_page(tmp_path: Path) -> None:
    stale = tmp_path / "crd-reference.md"
    stale.write_text("old\n")
    assert docgen.main(["--check", "--output", str(stale)]) == 1
    assert docgen.main(["--output", str(stale)]) == 0
    assert docgen.main(["--check", "--output", str(stale)]) == 0
