"""``python -m tools.image.build``: the Dockerfile's image as an OCI archive, built without Docker.

The Dockerfile stays the source of truth (users with Docker run ``docker build``); this reads it and
carries out its instructions, refusing any it does not know:

* ``FROM python:3.11.X-slim-bookworm`` becomes a root filesystem of a **pinned set of Debian bookworm
  packages** (``debian-bookworm.lock``: Python 3.11, dash, coreutils, ca-certificates and their
  libraries), downloaded with ``apt-get download`` and unpacked with ``dpkg-deb``. What their
  maintainer scripts would do is done here (passwd/group from base-passwd, the CA bundle, /bin/sh,
  the standard library's bytecode). The official image compiles CPython 3.11.X into /usr/local on the
  same Debian release; this is Debian's own 3.11 build in /usr.
* the build stage's ``RUN python3 -m venv V && V/bin/pip install .`` runs in a chroot of that root
  filesystem: the venv is made by the image's own interpreter, and pip (run from its wheel) installs
  the wheels of kubemeter and its dependencies, which pip built and downloaded on the host beforehand
  (same CPython 3.11 ABI and manylinux platform). Paths, script shebangs and bytecode are the image's.
* the final stage's ``COPY --from=build V V`` is that venv as a layer; ``RUN useradd --uid N ...``
  is the passwd and group lines useradd writes; ``USER``, ``ENV``, ``LABEL``, ``ENTRYPOINT`` and
  ``CMD`` go into the image config.

Why not mmdebstrap (what this builder used first): it runs apt's solver and every maintainer script in
a chroot for a full minbase (about 180 MB, 90 packages), which took 1868 s on this 2-core machine under
load; unpacking 48 pinned packages takes seconds, and the pip step is the same either way.

Cached outside the clone by content hash (the Dockerfile, the lock, this package, the files the build
stage copies): an unchanged tree is a cache hit in well under a second. The base layer is cached by
the lock's hash alone, so a change to kubemeter's code rebuilds only the venv.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed import images
from testbed.images import FileEntry, ImageConfig, Layer
from tools.image.dockerfile import Stage, exec_form, key_values, read_stages

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DEBIAN_LOCK = Path(__file__).with_name("debian-bookworm.lock")
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubemeter-image"
DEFAULT_REPOSITORY = "ghcr.io/kubemeter/kubemeter"
BASE = re.compile(r"python:3\.11\.\d+-slim-bookworm")
# Build-stage files that never reach an image (Docker would copy them; they change on every run).
CONTEXT_IGNORE = (
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "build",
)
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# The only RUN lines this builder knows how to carry out (else it says so rather than guess).
VENV_RUN = re.compile(r"python3 -m venv (?P<venv>/\S+) && (?P=venv)/bin/pip install (--no-cache-dir )?\.")
USERADD_RUN = re.compile(
    r"useradd --uid (?P<uid>\d+) --no-create-home --shell (?P<shell>\S+) (?P<name>[a-z_][a-z0-9_-]*)"
)
BUILD_RECIPE_VERSION = "2"  # bump to invalidate every cached image after a change in how it is built


class ImageBuildError(RuntimeError):
    pass


# ---- content hash -----------------------------------------------------------------------------------


def ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in CONTEXT_IGNORE)


def context_files(context: Path, source: str) -> Iterator[Path]:
    origin = context / source
    if origin.is_file():
        yield origin
        return
    for directory, dirs, files in os.walk(origin):
        dirs[:] = sorted(d for d in dirs if not ignored(d))
        for name in sorted(files):
            if not ignored(name):
                yield Path(directory) / name


def copy_sources(stage: Stage) -> list[str]:
    sources = []
    for arguments in stage.all("COPY"):
        words = arguments.split()
        if any(word.startswith("--from=") for word in words):
            continue
        sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(dockerfile: Path, context: Path) -> str:
    digest = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    feed("recipe", BUILD_RECIPE_VERSION.encode())
    feed("dockerfile", dockerfile.read_bytes())
    feed("lock", DEBIAN_LOCK.read_bytes())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        feed(f"builder/{module.name}", module.read_bytes())
    feed("testbed/images.py", Path(images.__file__).read_bytes())
    for stage in read_stages(dockerfile):
        for source in copy_sources(stage):
            for path in context_files(context, source):
                feed(f"context/{path.relative_to(context)}", path.read_bytes())
    return digest.hexdigest()


# ---- the Debian base --------------------------------------------------------------------------------


def locked_packages(lock: Path = DEBIAN_LOCK) -> list[tuple[str, str]]:
    packages = []
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("=")
            packages.append((name, version))
    return packages


def deb_filename(name: str, version: str) -> str:
    # apt-get download's name: the epoch's colon URL-encoded; architecture amd64 or all
    return f"{name}_{version.replace(':', '%3a')}_"


def fetch_debs(cache_dir: Path, timings: dict[str, float]) -> list[Path]:
    """The locked packages' .deb files, downloaded once into the cache."""
    started = time.monotonic()
    store = cache_dir / "debs"
    store.mkdir(parents=True, exist_ok=True)
    packages = locked_packages()

    def cached(name: str, version: str) -> Path | None:
        found = sorted(store.glob(f"{deb_filename(name, version)}*.deb"))
        return found[0] if found else None

    missing = [f"{name}={version}" for name, version in packages if cached(name, version) is None]
    if missing:
        if not shutil.which("apt-get"):
            raise ImageBuildError("apt-get is missing: the image's base is Debian bookworm packages")
        with tempfile.TemporaryDirectory(dir=store) as incoming:
            argv = ["apt-get", "download", "-q", *missing]
            result = subprocess.run(argv, cwd=incoming, capture_output=True, text=True, timeout=600)
            if result.returncode != 0 and os.geteuid() == 0:
                # stale package lists on a fresh machine: refresh once, as apt-get install would need
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
                result = subprocess.run(argv, cwd=incoming, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise ImageBuildError(
                    f"apt-get download failed ({result.returncode}): {result.stderr[-2000:]}\n"
                    f"A pinned version may have left the mirror: update {DEBIAN_LOCK.name} "
                    "(apt-cache policy NAME)"
                )
            for downloaded in Path(incoming).glob("*.deb"):
                downloaded.replace(store / downloaded.name)
    debs = []
    for name, version in packages:
        found = cached(name, version)
        if found is None:
            raise ImageBuildError(f"{name}={version} was not downloaded")
        debs.append(found)
    timings["debs"] = time.monotonic() - started
    return debs


def _run(argv: list[str], what: str, timeout_s: float = 600, **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise ImageBuildError(f"{what} failed ({result.returncode}):\n{result.stderr[-4000:]}")


def chroot(root: Path, command: str, env: dict[str, str], binds: dict[Path, str] | None = None) -> None:
    """``command`` by /bin/sh in a chroot of ``root`` inside a private mount namespace: its /proc,
    /dev and bind mounts end with it."""
    mounts = ['mount -t proc proc "$R/proc"', 'mount --rbind /dev "$R/dev"']
    for source, target in (binds or {}).items():
        (root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        mounts.append(f'mount --bind {shlex.quote(str(source))} "$R{target}"')
    script = " && ".join(mounts) + f' && exec chroot "$R" /bin/sh -c {shlex.quote(command)}'
    full_env = {"R": str(root), "PATH": BASE_ENV["PATH"], **env}
    _run(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
        command,
        env=full_env,
    )


def unpack_base(root: Path, debs: list[Path]) -> None:
    """The packages' files, and what their maintainer scripts would have done that the image needs."""
    root.mkdir(parents=True)
    # bookworm is merged-/usr: /bin, /sbin and /lib are links into /usr (as debootstrap makes them)
    for top in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        (root / top).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    for deb in debs:
        # --keep-directory-symlink: a package's ./bin/ must not replace the /bin -> usr/bin link
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        untar = subprocess.run(
            ["tar", "-x", "--keep-directory-symlink", "--numeric-owner", "-p", "-C", str(root)],
            stdin=fsys.stdout,
            capture_output=True,
            text=True,
        )
        if fsys.wait() != 0 or untar.returncode != 0:
            raise ImageBuildError(f"unpacking {deb.name} failed: {untar.stderr[-2000:]}")
    for directory, mode in (
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("root", 0o700),
        ("proc", 0o555),
        ("dev", 0o755),
    ):
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory).chmod(mode)
    # base-passwd's postinst: the system users and groups
    for name in ("passwd", "group"):
        shutil.copyfile(root / f"usr/share/base-passwd/{name}.master", root / "etc" / name)
    # dash's postinst: /bin/sh; python3's: nothing more (it ships /usr/bin/python3)
    (root / "usr/bin/sh").unlink(missing_ok=True)
    (root / "usr/bin/sh").symlink_to("dash")
    # ca-certificates' postinst (update-ca-certificates): the bundle every TLS client reads
    certs = sorted((root / "usr/share/ca-certificates").rglob("*.crt"))
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_bytes(b"".join(cert.read_bytes().rstrip(b"\n") + b"\n" for cert in certs))
    # python3.11-minimal's postinst (py3compile): the standard library's bytecode, so a read-only root
    # filesystem does not make every start compile it again
    chroot(root, "python3.11 -m compileall -q -j 0 /usr/lib/python3.11", {})


def base_layer(cache_dir: Path, timings: dict[str, float], work: Path) -> tuple[Layer, Path]:
    """The base layer (cached by the lock's hash) and an unpacked copy of it in ``work``."""
    key = _sha256(DEBIAN_LOCK.read_bytes() + BUILD_RECIPE_VERSION.encode() + Path(__file__).read_bytes())[:24]
    store = cache_dir / "base" / key
    root = work / "root"
    debs = fetch_debs(cache_dir, timings)
    started = time.monotonic()
    unpack_base(root, debs)
    timings["base_unpack"] = time.monotonic() - started
    meta = store / "layer.json"
    if meta.exists():
        layer = Layer(store / "layer.tar.gz", **json.loads(meta.read_text()))
        timings["base_layer"] = 0.0
        return layer, root
    started = time.monotonic()
    store.mkdir(parents=True, exist_ok=True)
    fresh = Layer.from_directory(root, workdir=store)
    fresh.path.replace(store / "layer.tar.gz")
    meta.write_text(json.dumps({"digest": fresh.digest, "diff_id": fresh.diff_id, "size": fresh.size}))
    timings["base_layer"] = time.monotonic() - started
    return Layer(store / "layer.tar.gz", fresh.digest, fresh.diff_id, fresh.size), root


# ---- the build stage: the venv ---------------------------------------------------------------------


def build_wheels(context: Path, stage: Stage, cache_dir: Path, work: Path) -> Path:
    """kubemeter's wheel and its dependencies' (and pip's, which the venv gets as ensurepip would give
    it), built and downloaded by the host's pip for CPython 3.11 on manylinux x86_64."""
    source = work / "src"
    for name in copy_sources(stage):
        origin = context / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns(*CONTEXT_IGNORE))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    wheels = work / "wheels"
    env = {**os.environ, "PIP_CACHE_DIR": str(cache_dir / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(source), "pip"],
        "pip wheel (kubemeter and its dependencies)",
        timeout_s=1200,
        env=env,
    )
    return wheels


def build_venv(root: Path, venv: str, wheels: Path) -> None:
    pip_wheel = sorted(wheels.glob("pip-*.whl"))[-1].name
    command = (
        f"python3 -m venv --without-pip {venv} && "
        f"{venv}/bin/python /wheels/{pip_wheel}/pip install -q --no-index --find-links /wheels kubemeter pip"
    )
    chroot(root, command, {"HOME": "/root", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, {wheels: "/wheels"})


# ---- the stages -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the Dockerfile asks for, checked against what this builder can do."""

    venv: str
    uid: int
    user_name: str
    shell: str
    config: ImageConfig
    build_stage: Stage
    notes: list[str] = field(default_factory=list)


def plan(dockerfile: Path) -> Plan:
    stages = read_stages(dockerfile)
    if len(stages) != 2 or stages[0].name is None or stages[1].name is not None:
        raise ImageBuildError("expected two stages: a named build stage, then the final stage")
    build, final = stages
    venv = user = None
    for stage in stages:
        if not BASE.fullmatch(stage.base):
            raise ImageBuildError(f"FROM {stage.base}: only python:3.11.X-slim-bookworm can be built here")
    for instruction in build.instructions:
        if instruction.keyword == "RUN":
            match = VENV_RUN.fullmatch(instruction.arguments)
            if not match:
                raise ImageBuildError(
                    f"build stage RUN {instruction.arguments!r} is not one this builder knows"
                )
            venv = match["venv"]
        elif instruction.keyword not in ("WORKDIR", "COPY"):
            raise ImageBuildError(f"build stage {instruction.keyword} is not supported without Docker")
    if venv is None:
        raise ImageBuildError("the build stage makes no venv")
    env = dict(BASE_ENV)
    labels: dict[str, str] = {}
    entrypoint = cmd = None
    image_user = None
    for instruction in final.instructions:
        keyword, arguments = instruction.keyword, instruction.arguments
        if keyword == "COPY":
            if arguments != f"--from={build.name} {venv} {venv}":
                raise ImageBuildError(f"final stage COPY {arguments!r}: only the build stage's venv is known")
        elif keyword == "RUN":
            user = USERADD_RUN.fullmatch(arguments)
            if not user:
                raise ImageBuildError(f"final stage RUN {arguments!r} is not one this builder knows")
        elif keyword == "USER":
            image_user = arguments
        elif keyword == "ENV":
            for name, value in key_values(arguments).items():
                env[name] = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: env.get(m.group(1), ""), value)
        elif keyword == "LABEL":
            labels |= key_values(arguments)
        elif keyword == "ENTRYPOINT":
            entrypoint = exec_form(arguments)
        elif keyword == "CMD":
            cmd = exec_form(arguments)
        else:
            raise ImageBuildError(f"final stage {keyword} is not supported without Docker")
    if user is None:
        raise ImageBuildError("the final stage adds no user")
    config = ImageConfig(
        entrypoint=entrypoint,
        cmd=cmd,
        user=image_user,
        env=[f"{key}={value}" for key, value in env.items()],
        labels=labels,
    )
    return Plan(venv, int(user["uid"]), user["name"], user["shell"], config, build)


def user_layer(root: Path, plan: Plan, work: Path) -> Layer:
    """What ``useradd --uid N --no-create-home --shell S NAME`` writes: a passwd line, a group of the
    same id (USERGROUPS_ENAB). The base has no /etc/shadow, so useradd would write none either."""
    files: dict[str, FileEntry] = {}
    lines = {
        "passwd": f"{plan.user_name}:x:{plan.uid}:{plan.uid}::/home/{plan.user_name}:{plan.shell}\n",
        "group": f"{plan.user_name}:x:{plan.uid}:\n",
    }
    for name, line in lines.items():
        files[f"/etc/{name}"] = FileEntry(data=(root / "etc" / name).read_bytes() + line.encode())
    return Layer.from_files(files, workdir=work)


# ---- entry points -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    archive: Path
    name: str
    key: str
    cached: bool
    seconds: float
    timings_s: dict[str, float]


def image_name(key: str, repository: str = DEFAULT_REPOSITORY) -> str:
    return f"{repository}:dev-{key[:12]}"


def build_image(
    dockerfile: Path = DOCKERFILE,
    context: Path = REPO_ROOT,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    repository: str = DEFAULT_REPOSITORY,
) -> BuiltImage:
    """The image for this tree: from the cache when the content hash matches, else built (needs root)."""
    started = time.monotonic()
    key = content_key(dockerfile, context)
    name = image_name(key, repository)
    archive = cache_dir / "images" / f"{key}.oci.tar"
    if archive.exists():
        return BuiltImage(archive, name, key, True, time.monotonic() - started, {})
    if os.geteuid() != 0:
        raise ImageBuildError("building the image needs root (chroot and mount namespaces)")
    steps = plan(dockerfile)
    timings: dict[str, float] = {}
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kubemeter-image-", dir=cache_dir) as scratch:
        work = Path(scratch)
        base, root = base_layer(cache_dir, timings, work)
        mark = time.monotonic()
        wheels = build_wheels(context, steps.build_stage, cache_dir, work)
        timings["wheels"] = time.monotonic() - mark
        mark = time.monotonic()
        build_venv(root, steps.venv, wheels)
        timings["venv"] = time.monotonic() - mark
        mark = time.monotonic()
        venv_layer = Layer.from_directory(root / steps.venv.lstrip("/"), prefix=steps.venv, workdir=work)
        users = user_layer(root, steps, work)
        images.write_oci_archive(archive, name, [base, venv_layer, users], steps.config)
        timings["layers"] = time.monotonic() - mark
    with contextlib.suppress(OSError):
        (cache_dir / "images" / f"{key}.timings.json").write_text(json.dumps(timings, indent=1))
    return BuiltImage(archive, name, key, False, time.monotonic() - started, timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.image.build", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY)
    args = parser.parse_args(argv)
    try:
        image = build_image(cache_dir=args.cache_dir, repository=args.repository)
    except ImageBuildError as error:
        print(f"image build failed: {error}", file=sys.stderr)
        return 1
    how = "warm (cache hit)" if image.cached else "cold (built)"
    size_mib = image.archive.stat().st_size / 2**20
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in image.timings_s.items())
    print(f"image {image.name}: {how} in {image.seconds:.1f} s{f' ({steps})' if steps else ''}")
    print(f"archive {image.archive} ({size_mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
