"""The power-loss check can tell an fsync'd write from one left in the page cache (bench/powerloss.py):
after the simulated cut, the synced bytes are on the copied disk and the unsynced ones are not."""

from __future__ import annotations

import os
from pathlib import Path

from bench import powerloss
from tests.support.ci import unavailable


def test_power_cut_keeps_what_was_fsynced_and_drops_what_was_not(tmp_path: Path) -> None:
    why_not = powerloss.unavailable()
    if why_not is not None:
        unavailable(f"the power-loss check cannot run here: {why_not}")
    image = powerloss.new_image(tmp_path / "disk.img")
    with powerloss.mounted(image, tmp_path / "before") as volume:
        os.sync()  # the fresh filesystem itself is on the disk, as for a volume in use
        synced, unsynced = volume / "synced.bin", volume / "unsynced.bin"
        with synced.open("wb") as handle:
            handle.write(b"s" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
        unsynced.write_bytes(b"u" * 65536)
        crashed = powerloss.cut_power(image, tmp_path / "after.img")
    with powerloss.mounted(crashed, tmp_path / "after") as volume:
        assert (volume / "synced.bin").read_bytes() == b"s" * 65536
        left = (volume / "unsynced.bin").read_bytes() if (volume / "unsynced.bin").exists() else b""
        assert left != b"u" * 65536
