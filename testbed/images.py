"""OCI image archives written without Docker or a registry, for the real node's containerd.

An archive is an OCI image layout in a tar file (``oci-layout``, ``index.json`` and
``blobs/sha256/…`` holding the config, the manifest and gzip layers), which
``ctr -n k8s.io images import`` accepts (:meth:`testbed.realnode.RealNode.import_image`). The image
name travels in the index annotation ``io.containerd.image.name``. Everything is written
deterministically (mtime 0, sorted entries, gzip without a timestamp), so the same inputs give the same
digests and an image can be cached by its content.

    layer = Layer.from_files({"/bin/busybox": FileEntry.from_path(Path("/bin/busybox"), mode=0o755)})
    write_oci_archive(path, "kubemeter.local/busybox:1", [layer], ImageConfig(entrypoint=["/bin/sh"]))
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
BUSYBOX_STATIC = Path("/bin/busybox")  # Debian's busybox-static
# The applets the test images link; `busybox --list` has the rest.
BUSYBOX_APPLETS = ("sh", "sleep", "echo", "cat", "ls", "id", "true", "false", "yes", "timeout", "env", "test")


@dataclass(frozen=True)
class FileEntry:
    """One entry of a layer: a regular file (``data``), a directory (``data`` None, no target) or a
    symlink (``symlink_to``). Owner and mode are explicit so an image's files do not depend on who
    built it."""

    data: bytes | None = None
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    symlink_to: str | None = None
    source: Path | None = None  # a regular file read from disk at write time (large files)

    @classmethod
    def from_path(cls, path: Path, mode: int | None = None, uid: int = 0, gid: int = 0) -> FileEntry:
        return cls(
            mode=stat.S_IMODE(path.stat().st_mode) if mode is None else mode, uid=uid, gid=gid, source=path
        )

    @classmethod
    def directory(cls, mode: int = 0o755, uid: int = 0, gid: int = 0) -> FileEntry:
        return cls(mode=mode, uid=uid, gid=gid)

    @classmethod
    def symlink(cls, target: str) -> FileEntry:
        return cls(mode=0o777, symlink_to=target)


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through to ``sink``."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += len(view)
        self.sink.write(view)
        return len(view)


@dataclass
class Layer:
    """A gzip layer on disk with its digests: ``digest`` of the compressed blob (the manifest's),
    ``diff_id`` of the uncompressed tar (the config's ``rootfs.diff_ids``)."""

    path: Path
    digest: str
    diff_id: str
    size: int

    @classmethod
    def from_files(cls, files: Mapping[str, FileEntry], workdir: Path | None = None) -> Layer:
        """A layer holding ``files`` (absolute paths in the image). Parent directories are added as
        root-owned 0755 unless listed."""
        entries: dict[str, FileEntry] = {}
        for name, entry in files.items():
            parts = Path(name.lstrip("/")).parts
            for depth in range(1, len(parts)):
                entries.setdefault("/".join(parts[:depth]), FileEntry.directory())
            entries["/".join(parts)] = entry
        return cls._write(sorted(entries.items()), workdir)

    @classmethod
    def from_directory(
        cls, root: Path, prefix: str = "/", uid: int = 0, gid: int = 0, workdir: Path | None = None
    ) -> Layer:
        """A layer holding the tree under ``root`` at ``prefix`` in the image, modes and symlinks as
        on disk, owned by ``uid:gid``."""
        files: dict[str, FileEntry] = {}
        base = prefix.rstrip("/")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            relative = here.relative_to(root)
            if relative != Path("."):
                files[f"{base}/{relative}"] = FileEntry.directory(stat.S_IMODE(here.stat().st_mode), uid, gid)
            for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
                path = here / name
                target = f"{base}/{path.relative_to(root)}"
                if path.is_symlink():
                    files[target] = FileEntry.symlink(os.readlink(path))
                elif path.is_file():
                    files[target] = FileEntry.from_path(path, uid=uid, gid=gid)
        return cls.from_files(files, workdir)

    @classmethod
    def _write(cls, entries: Iterable[tuple[str, FileEntry]], workdir: Path | None) -> Layer:
        handle, name = tempfile.mkstemp(suffix=".tar.gz", dir=workdir)
        with os.fdopen(handle, "wb") as out:
            compressed = _HashingWriter(out)
            with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, compresslevel=6) as gz:
                plain = _HashingWriter(gz)  # type: ignore[arg-type]
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for path, entry in entries:
                        _add(tar, path, entry)
        return cls(
            Path(name),
            f"sha256:{compressed.sha256.hexdigest()}",
            f"sha256:{plain.sha256.hexdigest()}",
            compressed.size,
        )


def _add(tar: tarfile.TarFile, path: str, entry: FileEntry) -> None:
    info = tarfile.TarInfo(path)
    info.mtime = 0
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    if entry.symlink_to is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.symlink_to
        tar.addfile(info)
    elif entry.source is not None:
        info.size = entry.source.stat().st_size
        with entry.source.open("rb") as source:
            tar.addfile(info, source)
    elif entry.data is not None:
        info.size = len(entry.data)
        tar.addfile(info, io.BytesIO(entry.data))
    else:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an OCI image config (the Dockerfile's ENTRYPOINT, CMD, USER, ENV,
    WORKDIR, LABEL)."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    user: str | None = None
    env: list[str] = field(
        default_factory=lambda: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    )
    working_dir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def as_oci(self) -> dict[str, Any]:
        config: dict[str, Any] = {"Env": self.env}
        for key, value in (
            ("Entrypoint", self.entrypoint),
            ("Cmd", self.cmd),
            ("User", self.user),
            ("WorkingDir", self.working_dir),
            ("Labels", self.labels or None),
        ):
            if value is not None:
                config[key] = value
        return config


@dataclass(frozen=True)
class ImageArchive:
    path: Path
    name: str
    manifest_digest: str


def write_oci_archive(path: Path, name: str, layers: list[Layer], config: ImageConfig) -> ImageArchive:
    """Write the OCI image ``name`` (e.g. ``kubemeter.local/busybox:1``; a dot in the first part keeps
    it from being read as a Docker Hub name) with ``layers`` (bottom first) to the tar ``path``."""
    image_config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": config.as_oci(),
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created_by": "testbed.images"} for _ in layers],
        },
        sort_keys=True,
    ).encode()
    config_digest = f"sha256:{hashlib.sha256(image_config).hexdigest()}"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(image_config)},
            "layers": [
                {"mediaType": MEDIA_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        },
        sort_keys=True,
    ).encode()
    manifest_digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rpartition(":")[2],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        blobs: dict[str, bytes | Path] = {
            "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
            "index.json": index,
            f"blobs/sha256/{config_digest[7:]}": image_config,
            f"blobs/sha256/{manifest_digest[7:]}": manifest,
        }
        for layer in layers:
            blobs[f"blobs/sha256/{layer.digest[7:]}"] = layer.path
        for directory in ("blobs", "blobs/sha256"):
            _add(tar, directory, FileEntry.directory())
        for member, content in blobs.items():
            if isinstance(content, Path):
                _add(tar, member, FileEntry(source=content))
            else:
                _add(tar, member, FileEntry(data=content))
    partial.replace(path)
    return ImageArchive(path, name, manifest_digest)


def busybox_image(
    path: Path, name: str = "kubemeter.local/busybox:1", workdir: Path | None = None
) -> ImageArchive:
    """A one-layer image with Debian's static busybox at /bin/busybox and the usual applets linked,
    for test pods (``command: ["sh", "-c", ...]``)."""
    if not BUSYBOX_STATIC.is_file():
        raise FileNotFoundError(f"{BUSYBOX_STATIC} is missing; install Debian's busybox-static")
    files: dict[str, FileEntry] = {"/bin/busybox": FileEntry.from_path(BUSYBOX_STATIC, mode=0o755)}
    for applet in BUSYBOX_APPLETS:
        files[f"/bin/{applet}"] = FileEntry.symlink("busybox")
    files["/tmp"] = FileEntry.directory(0o1777)
    files["/etc/passwd"] = FileEntry(
        data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    files["/etc/group"] = FileEntry(data=b"root:x:0:\nnogroup:x:65534:\n")
    layer = Layer.from_files(files, workdir)
    try:
        return write_oci_archive(path, name, [layer], ImageConfig(cmd=["sh"]))
    finally:
        layer.path.unlink(missing_ok=True)


def single_binary_image(
    path: Path, name: str, binary: Path, config: ImageConfig | None = None, workdir: Path | None = None
) -> ImageArchive:
    """An image holding one static ``binary`` at ``/<its name>``, its entrypoint (the pause image)."""
    target = f"/{binary.name}"
    layer = Layer.from_files({target: FileEntry.from_path(binary.resolve(), mode=0o755)}, workdir)
    try:
        return write_oci_archive(path, name, [layer], config or ImageConfig(entrypoint=[target], env=[]))
    finally:
        layer.path.unlink(missing_ok=True)
