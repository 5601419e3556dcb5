"""``make bench`` finds every suite by its file name, so a new ``bench/bench_*.py`` joins the run."""

from __future__ import annotations

import importlib

from bench.run import BENCH_DIR, suites


def test_every_bench_file_is_a_registered_suite_with_about_and_run() -> None:
    names = suites()
    files = {f"bench.{path.stem}" for path in BENCH_DIR.glob("bench_*.py")}
    assert names[:2] == ["bench.yardsticks", "bench.accuracy"]
    assert files <= set(names)
    for name in names:
        module = importlib.import_module(name)
        assert isinstance(module.ABOUT, str) and module.ABOUT, name
        assert callable(module.run), name
