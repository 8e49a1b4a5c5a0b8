"""What every benchmark shares: the machine description, random-weight checkpoints, timing helpers.

No weights can be downloaded here, so benchmarks build the real open_clip architecture with
seeded random weights and save it in loupe's checkpoint format. Speed does not depend on the
weights' values, so the figures hold for the pretrained model of the same architecture.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = REPO / "benchmarks" / "out"
FLICKR = REPO.parent / "shared" / "data" / "flickr8k_800" / "images"
CAPTIONS = REPO.parent / "shared" / "data" / "flickr8k_800" / "captions.json"
PYTHON = sys.executable
WORKDIR = Path("/tmp/loupe-bench")  # made-up photo sets and indexes, kept between runs


def checkpoint(model: str = "ViT-B-32") -> Path:
    """A random-weight checkpoint of `model` under benchmarks/out/models (made once)."""
    from loupe.indexer.models.random_weights import save_random_model

    path = OUT / "models" / f"{model}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_random_model(path, model)
    return path


def load_checkpoint(path: Path, device: str = "cpu"):
    """The loupe encoder of a checkpoint file (random or trained weights), on `device`."""
    from loupe.indexer.models.encoder import load_encoder
    from loupe.indexer.models.spec import make_spec

    return load_encoder(make_spec(None, None, path), device)


def size_sweep_parser(doc: str, sizes: str) -> argparse.ArgumentParser:
    """The command line of a benchmark run at several sizes in turn, described by its docstring's
    first line: `--sizes` (comma-separated counts, parsed to a list of ints, default `sizes`) and
    `--workdir` (where the made-up sets of each size are kept)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--sizes", type=lambda text: [int(n) for n in text.split(",")], default=sizes,
                   help="comma-separated counts")
    p.add_argument("--workdir", type=Path, default=WORKDIR)
    return p


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    """CPU, cores, memory, library versions, date and load: what a figure depends on."""
    import faiss
    import numpy
    import open_clip
    import PIL
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16_units": sorted(flags & {"avx512_bf16", "amx_bf16"}) or "none",
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cuda": torch.cuda.is_available(),
        "load_average_at_start": load_average(),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


SOURCE_FOLDERS = ("loupe", "cli", "indexer", "retrieval")


@functools.lru_cache(maxsize=None)
def compile_bytecode(tree: Path = REPO) -> None:
    """Byte-compile loupe's modules in `tree`, as `pip install` does for an installed package.

    An editable install run with PYTHONDONTWRITEBYTECODE=1 (set on this machine) compiles every
    module it imports on every run, ~25 ms of a cold search; the peers run from wheels pip compiled.
    """
    import compileall

    for folder in SOURCE_FOLDERS:
        if (tree / folder).is_dir():
            compileall.compile_dir(str(tree / folder), quiet=1)


def loupe_env(home: Path | None = None, **extra: str) -> dict:
    """The environment of a loupe process a benchmark starts (its modules compiled first, once)."""
    compile_bytecode(REPO)
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOUPE_NO_SERVER="1")
    if home is not None:
        env["LOUPE_HOME"] = str(home)
    env.update(extra)
    return env


def run_loupe(args: list[str], home: Path, check: bool = True, **extra_env: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run `loupe ARGS` as a user would, in a fresh process; (wall seconds, result)."""
    t = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-m", "loupe", *map(str, args)], cwd=REPO, env=loupe_env(home, **extra_env), capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if check and proc.returncode != 0:
        raise RuntimeError(f"loupe {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return wall, proc


def start_serve(home: Path, *args: str, code: Path = REPO, module: str = "loupe", timeout: float = 600) -> tuple[subprocess.Popen, object]:
    """Start `loupe serve --home HOME ARGS` from the checkout `code` (its command module `module`)
    and wait until it has written its state file; (process, state)."""
    from loupe.indexer.storage.locations import resolve_location
    from loupe.retrieval.web.client import read_state, state_file

    path = state_file(resolve_location(home))
    proc = subprocess.Popen(
        [PYTHON, "-m", module, "serve", "--home", str(home), *args], cwd=code, env=loupe_env(PYTHONPATH=str(code)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        state = read_state(path)
        if state is not None and state.pid == proc.pid:
            return proc, state
        time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"loupe serve exited ({proc.returncode}):\n{proc.stderr.read()}")
    stop_serve(proc)
    raise RuntimeError(f"loupe serve did not start in {timeout:.0f} s")


def stop_serve(proc: subprocess.Popen) -> None:
    """Stop a `loupe serve` from `start_serve` (killed if it does not stop within a minute)."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {path}")
    return path
