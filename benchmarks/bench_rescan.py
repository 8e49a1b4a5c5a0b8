"""No-change re-scan: `loupe index FOLDER` run again over N unchanged files (target: 100k in <= 2 s).

    .venv/bin/python benchmarks/bench_rescan.py                 # 10k and 100k files
    .venv/bin/python benchmarks/bench_rescan.py --sizes 2000    # quick

Makes N tiny distinct PNGs (in --workdir, default /tmp/loupe-bench), indexes them once with
the small `loupe-tiny` model (the model is not what a re-scan measures), then times repeated
no-change runs of the real command from the shell: process start, walk, one catalog query,
nothing opened or hashed, no model loaded. Writes benchmarks/out/bench_rescan.json.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from common import size_sweep_parser, checkpoint, load_average, machine, median, run_loupe, write_json


def make_files(folder: Path, n: int, per_dir: int = 1000) -> None:
    """`n` distinct 8x8 PNGs, `per_dir` to a sub-folder (as photo libraries are organised)."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists() and done.read_text() == f"{n} png":
        return
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(n):
        sub = folder / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buf, "PNG")
        (sub / f"{i:07d}.png").write_bytes(buf.getvalue())
    done.write_text(f"{n} png")


def bench(n: int, workdir: Path, repeats: int) -> dict:
    folder = workdir / f"rescan-{n}"
    home = workdir / f"rescan-{n}-home"
    make_files(folder, n)
    shutil.rmtree(home, ignore_errors=True)
    first, proc = run_loupe(["index", folder, "--checkpoint", checkpoint("loupe-tiny"), "-b", "256", "--json"], home)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{n} files: first index {first:.1f} s ({report['embedded']} embedded)")
    walls, scans = [], []
    for _ in range(repeats):
        wall, proc = run_loupe(["index", folder, "--json"], home)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["unchanged"] == n and r["embedded"] == 0, r
        walls.append(wall)
        scans.append(r["seconds"])
        print(f"  no-change re-scan: {wall:.2f} s wall ({r['seconds']:.2f} s inside index_folder), load {load_average()}")
    eager, _ = run_loupe(["index", folder, "--checkpoint", checkpoint("loupe-tiny"), "--json"], home)
    print(f"  same, naming the model (loaded for the binding check): {eager:.2f} s")
    return {
        "files": n,
        "rescan_naming_model_wall_seconds": round(eager, 3),
        "first_index_seconds": round(first, 2),
        "rescan_wall_seconds": [round(w, 3) for w in walls],
        "rescan_wall_median": round(median(walls), 3),
        "rescan_in_process_median": round(median(scans), 3),
        "target_seconds": 2.0 if n >= 100_000 else None,
        "met": median(walls) <= 2.0 if n >= 100_000 else None,
    }


def main() -> None:
    p = size_sweep_parser(__doc__, "10000,100000")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    out = {"machine": machine(), "runs": []}
    for n in a.sizes:
        out["runs"].append(bench(n, a.workdir, a.repeats))
    out["load_average_at_end"] = load_average()
    write_json("bench_rescan.json", out)


if __name__ == "__main__":
    main()
