"""The image built without Docker (tools/image) is the Dockerfile's: its entrypoint, command, user,
environment and labels come from the Dockerfile; every blob matches its digest; unpacked, the
``kubemeter`` command runs as uid 65532 from the image's own virtualenv; an unchanged tree is a cache
hit and a changed file is not. Running it on the real kubelet node: tests/e2e/test_helm_real_node.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.ci import unavailable
from tools.image.archive import OciImage, read_oci_archive, unpack_root
from tools.image.build import (
    DOCKERFILE,
    REPO_ROOT,
    BuiltImage,
    ImageBuildError,
    build_image,
    content_key,
)
from tools.image.dockerfile import exec_form, key_values, read_stages

IMAGE_UID = 65532
# Builds the image (root; Debian's mirror and PyPI on a cold cache, about 2 minutes): with the
# integration tests.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built() -> BuiltImage:
    if os.geteuid() != 0:
        unavailable("building the image needs root (chroot, mount namespaces)")
    try:
        image = build_image()
    except ImageBuildError as error:
        pytest.fail(f"the image did not build: {error}", pytrace=False)
    how = "warm (cache hit)" if image.cached else f"cold {image.timings_s}"
    print(f"\n[image] {image.name} {how}: {image.seconds:.1f} s")
    return image


@pytest.fixture(scope="module")
def image(built: BuiltImage) -> OciImage:
    return read_oci_archive(built.archive)


@pytest.fixture(scope="module")
def root(image: OciImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("image-root")
    directory.chmod(0o755)  # "/" as a runtime makes it (mktemp makes 0700, which 65532 cannot enter)
    unpack_root(image, directory)
    return directory


def test_the_config_is_the_dockerfiles_entrypoint_command_user_and_labels(
    built: BuiltImage, image: OciImage
) -> None:
    final = read_stages(DOCKERFILE)[-1]
    config = image.config["config"]
    assert config["Entrypoint"] == exec_form(final.all("ENTRYPOINT")[-1]) == ["kubemeter"]
    assert config["Cmd"] == exec_form(final.all("CMD")[-1])
    assert config["User"] == final.all("USER")[-1] == f"{IMAGE_UID}:{IMAGE_UID}"
    labels: dict[str, str] = {}
    for arguments in final.all("LABEL"):
        labels |= key_values(arguments)
    assert config["Labels"] == labels and labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].startswith("/opt/kubemeter/bin:")
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert image.name == built.name and built.name.endswith(f":dev-{built.key[:12]}")
    assert image.config["os"] == "linux" and image.config["architecture"] == "amd64"


def test_kubemeter_runs_from_the_image_venv_as_uid_65532(root: Path) -> None:
    passwd = (root / "etc/passwd").read_text()
    assert f"kubemeter:x:{IMAGE_UID}:{IMAGE_UID}:" in passwd
    probe = (
        "import os, sys, kubemeter.agent.runtime, kubemeter.gateway.main, kubemeter_operator.main; "
        "print(os.getuid(), os.getgid(), sys.prefix)"
    )
    script = (
        'mount -t proc proc "$R/proc" && exec chroot --userspec=65532:65532 "$R" /bin/sh -c '
        '\'cd / && kubemeter --help && /opt/kubemeter/bin/python -c "$0"\' "$0"'
    )
    env = {"R": str(root), "PATH": "/opt/kubemeter/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "roles:" in result.stdout and "agent" in result.stdout and "gateway" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"{IMAGE_UID} {IMAGE_UID} /opt/kubemeter"


def test_the_final_image_holds_no_build_context_and_no_pip_cache(root: Path) -> None:
    assert not (root / "src").exists()
    assert not (root / "root/.cache").exists()
    assert not (root / "tmp/host-ca.crt").exists()
    assert (root / "opt/kubemeter/bin/kubemeter").is_file()


def test_an_unchanged_tree_is_a_cache_hit_and_a_changed_file_is_not(
    built: BuiltImage, tmp_path: Path
) -> None:
    again = build_image()
    print(f"\n[image] warm: {again.seconds:.2f} s")
    assert again.cached and again.archive == built.archive and again.name == built.name
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, context / name)
    for name in ("agents", "operator", "cli"):
        shutil.copytree(REPO_ROOT / name, context / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert content_key(DOCKERFILE, context) == built.key
    (context / "agents/kubemeter/__init__.py").write_text("# changed\n")
    assert content_key(DOCKERFILE, context) != built.key


def test_the_image_archive_names_itself_for_ctr_import(built: BuiltImage) -> None:
    import tarfile

    with tarfile.open(built.archive) as tar:
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.loads(index_file.read())
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[union-attr]
    (manifest,) = index["manifests"]
    assert manifest["annotations"]["io.containerd.image.name"] == built.name
