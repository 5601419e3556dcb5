"""Reading an OCI image archive back: its config, its layers checked against their digests, and the
root filesystem they make (whiteouts applied), for tests and for a look inside without a runtime."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OciImage:
    name: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[bytes]  # uncompressed tars, in order


def read_oci_archive(archive: Path) -> OciImage:
    """Every blob is checked: a layer's digest against its gzip bytes, its diff_id against the tar."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            if member is None:
                raise ValueError(f"{archive}: blob {digest} is missing")
            data = member.read()
            if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
                raise ValueError(f"{archive}: blob {digest} does not match its digest")
            return data

        layout = tar.extractfile("oci-layout")
        index_file = tar.extractfile("index.json")
        if layout is None or index_file is None:
            raise ValueError(f"{archive}: not an OCI image layout (oci-layout, index.json)")
        index = json.loads(index_file.read())
        (entry,) = index["manifests"]
        manifest = json.loads(blob(entry["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        layers = [gzip.decompress(blob(layer["digest"])) for layer in manifest["layers"]]
    for tar_bytes, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
        if f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}" != diff_id:
            raise ValueError(f"{archive}: a layer does not match its diff_id {diff_id}")
    return OciImage(entry["annotations"]["io.containerd.image.name"], manifest, config, layers)


def unpack_root(image: OciImage, root: Path) -> None:
    """Apply the layers in order as a runtime would: ``.wh.<name>`` deletes ``<name>``."""
    root.mkdir(parents=True, exist_ok=True)
    for layer in image.layers:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            members = []
            for member in tar.getmembers():
                parent, _, name = member.name.rpartition("/")
                if name.startswith(".wh."):
                    gone = root / parent / name.removeprefix(".wh.")
                    if gone.is_dir() and not gone.is_symlink():
                        shutil.rmtree(gone)
                    else:
                        gone.unlink(missing_ok=True)
                    continue
                target = root / member.name
                if target.is_dir() and not target.is_symlink() and not member.isdir():
                    shutil.rmtree(target)
                elif (target.is_symlink() or target.is_file()) and not member.isdir():
                    target.unlink()
                members.append(member)
            tar.extractall(root, members=members, numeric_owner=True, filter="fully_trusted")
