"""The benchmarks run where the README's main job installed loupe: without pytest or tests/."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

BENCHMARKS = ("bench_index", "bench_query", "bench_rescan", "bench_serve", "bench_fidelity", "bench_ray", "bench_video", "bench_duplicates", "flickr30k_eval")


def test_benchmarks_import_and_make_checkpoints_without_pytest(tmp_path):
    """As `.venv/bin/python benchmarks/bench_query.py` runs them: script folder first, pytest absent."""
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["pytest"] = None  # as after `pip install -e '.[cpu]'`: importing it fails
        sys.path[:0] = [{str(REPO / "benchmarks")!r}, {str(REPO)!r}]
        import common
        from pathlib import Path
        common.OUT = Path({str(tmp_path)!r})
        path = common.checkpoint("loupe-tiny")
        for name in {BENCHMARKS!r}:
            importlib.import_module(name)
        from loupe.indexer.storage.synthetic import ClipLike
        assert ClipLike(dim=32, topics=4, subtopics=2).images(10).shape == (10, 32)
        assert "pytest" not in [m for m, v in sys.modules.items() if v is not None]
        print(path)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "models" / "loupe-tiny.pt").stat().st_size > 0
