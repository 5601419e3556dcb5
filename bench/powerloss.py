"""A power cut, simulated: an ext4 filesystem on a loop device whose image file can be copied at any
moment, and the copy is what a disk would hold after the power went out then.

Writes to ``/dev/loopN`` land in the image file; what the filesystem above still holds in its page
cache (written but never fsync'd or written back) has not reached the image. So killing the process
and copying the image at once leaves a disk with exactly the data that reached the block device:
what an ``fsync`` put there, plus whatever the kernel happened to write back on its own (ext4 commits
its journal every 5 s; dirty pages are written back after 30 s). Mounting the copy replays the
journal, as a reboot would. A process killed with SIGKILL alone cannot tell the two apart: the page
cache survives it.

Needs root (``losetup``, ``mount``). This machine has no device-mapper (so no dm-flakey) and
``fsfreeze`` writes the page cache back before it freezes, so neither can drop unsynced writes; the
loop-image copy can.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

IMAGE_MIB = 512


def unavailable() -> str | None:
    """Why a loop-device filesystem cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root for losetup and mount"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/dev/loop-control").exists():
        return "the kernel has no loop devices (/dev/loop-control is missing)"
    return None


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    """``image`` attached to a free loop device and mounted at ``mountpoint``; undone on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    device = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mount", "-t", "ext4", device, str(mountpoint))
        try:
            yield mountpoint
        finally:
            with contextlib.suppress(RuntimeError):
                _run("umount", str(mountpoint))
    finally:
        with contextlib.suppress(RuntimeError):
            _run("losetup", "--detach", device)


def new_image(image: Path) -> Path:
    """A sparse image file holding a fresh ext4 filesystem."""
    with image.open("wb") as handle:
        handle.truncate(IMAGE_MIB * 2**20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    return image


def cut_power(image: Path, copy: Path) -> Path:
    """The disk as a power cut now would leave it: the image's bytes, not the page cache above it.

    Call it right after the writing process was killed; the copy is taken with ``cp --sparse``."""
    _run("cp", "--sparse=always", str(image), str(copy))
    return copy
