"""In-process runner vs the Ray runner on a local cluster, and the catalog's commit rate.

    .venv/bin/python benchmarks/bench_ray.py                       # loupe-tiny on 800 photos, ViT-B-32 on 200
    .venv/bin/python benchmarks/bench_ray.py --models loupe-tiny --limit 200 --commit-rows 5000

(1) `loupe index` (in-process: decode threads + model in one process) and `loupe index --ray
--workers N` (a local Ray cluster started by the command: read+decode tasks, one embedding actor)
on the same photos, fresh index each, whole commands: img/s of the run (report) and wall time of
the process (Ray start-up, actor model load included); per-stage seconds from the JSON report.
(2) Catalog commits: rows/s of the commit unit (`stages.Committer.embedded`: one transaction per
batch of rows with their 512-d vectors) on SQLite and, where the server binaries exist, on a
throwaway PostgreSQL cluster; bytes per catalog row.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from common import FLICKR, checkpoint, load_average, machine, run_loupe, write_json


def photos(limit: int, into: Path) -> Path:
    """The first `limit` flickr8k photos, linked into a folder (not copied into the repo)."""
    into.mkdir(parents=True, exist_ok=True)
    for p in sorted(FLICKR.iterdir())[:limit]:
        (into / p.name).symlink_to(p)
    return into


def tiny_checkpoint(out: Path) -> Path:
    from loupe.indexer.models.random_weights import save_random_model

    path = out / "loupe-tiny.pt"
    if not path.exists():
        save_random_model(path)
    return path


def steady(report: dict) -> dict:
    """Ray only: seconds to the first batch back (cluster, worker imports, actor model load), and
    the embedding actors' rate over their model time (Ray Data bundles blocks, so the driver's
    rate after the first batch does not measure the steady state)."""
    st = report["stages"]
    if "first_batch" not in st:
        return {}
    embed = st.get("embed", {})
    return {"startup_seconds": st["first_batch"]["seconds"], "actor_img_per_s": embed.get("per_second")}


def runners(model: str, ckpt: Path, folder: Path, workers: int, batch: int, tmp: Path) -> dict:
    out = {}
    for name, extra in (("in-process", []), ("ray", ["--ray"])):
        home = tmp / f"home-{model}-{name}"
        shutil.rmtree(home, ignore_errors=True)
        load = load_average()
        wall, proc = run_loupe(
            ["index", folder, "--checkpoint", ckpt, "--batch-size", batch, "--workers", workers, "--json", *extra], home
        )
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        out[name] = {
            "embedded": report["embedded"],
            "run_seconds": round(report["seconds"], 2),
            "img_per_s": round(report["embedded"] / report["seconds"], 1),
            "wall_seconds": round(wall, 2),
            "img_per_s_wall": round(report["embedded"] / wall, 1),
            "stages": report["stages"],
            **steady(report),
            "load_average_before": load,
        }
        print(f"{model:>10} {name:>10}: {out[name]['img_per_s']:7.1f} img/s in the run ({out[name]['run_seconds']:.1f} s), "
              f"{out[name]['img_per_s_wall']:6.1f} img/s wall ({wall:.1f} s)"
              + (f", first batch after {out[name]['startup_seconds']:.1f} s" if "startup_seconds" in out[name] else "")
              + f"  load {load}")
    out["ray_over_in_process"] = round(out["ray"]["img_per_s"] / out["in-process"]["img_per_s"], 3)
    return out


def commit_rate(url: str, rows: int, batch: int, dim: int = 512) -> dict:
    """Rows/s of the commit unit: `rows` fresh rows with vectors, `batch` per transaction."""
    import numpy as np

    from loupe.indexer.storage.catalog import Catalog
    from loupe.indexer.pipeline.runner import IndexReport
    from loupe.indexer.pipeline.stages import Committer, WorkUnit

    catalog = Catalog(url)
    catalog.create_meta(model="bench", pretrained=None, checkpoint_path=None, checkpoint_size=None,
                        checkpoint_mtime_ns=None, weights_id="bench", dim=dim)
    rng = np.random.default_rng(0)
    known: dict[str, int] = {}
    commit = Committer(catalog, known, IndexReport(root="/bench"))
    t = time.perf_counter()
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        items = [(WorkUnit(f"/bench/photos/{start + i:09d}.jpg", 100_000, 1), f"{start + i:032x}", None) for i in range(n)]
        commit.embedded(items, vecs)
    seconds = time.perf_counter() - t
    catalog.engine.dispose()
    return {"rows": rows, "batch": batch, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1)}


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    return found or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [None])[-1]


def postgres_commit_rate(rows: int, batch: int) -> dict | None:
    """The same on a throwaway local PostgreSQL cluster (fsync on: durable commits)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        return None
    base = Path(tempfile.mkdtemp(prefix="loupe-pg-bench-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")

    def run(*cmd: str) -> None:
        subprocess.run((["runuser", "-u", "postgres", "--"] if as_root else []) + list(cmd), check=True, capture_output=True, timeout=120)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run(initdb, "-D", str(data), "-A", "trust", "-U", "loupe")
    run(pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o", f"-k {sock} -p {port} -c listen_addresses=''", "start")
    try:
        return commit_rate(f"postgresql+psycopg://loupe@/postgres?host={sock}&port={port}", rows, batch)
    finally:
        run(pg_ctl, "-D", str(data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="loupe-tiny,ViT-B-32")
    ap.add_argument("--limit", type=int, default=800, help="photos for loupe-tiny")
    ap.add_argument("--limit-large", type=int, default=200, help="photos for ViT-B-32")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--commit-rows", type=int, default=20000)
    ap.add_argument("--commit-batch", type=int, default=256)
    args = ap.parse_args()
    result = {"machine": machine(), "runners": {}, "commit": {}}
    with tempfile.TemporaryDirectory(prefix="loupe-bench-ray-") as tmp_s:
        tmp = Path(tmp_s)
        for model in args.models.split(","):
            n = args.limit if model == "loupe-tiny" else args.limit_large
            folder = photos(n, tmp / f"photos-{n}") if not (tmp / f"photos-{n}").exists() else tmp / f"photos-{n}"
            ckpt = tiny_checkpoint(tmp) if model == "loupe-tiny" else checkpoint(model)
            result["runners"][f"{model}/{n}"] = runners(model, ckpt, folder, args.workers, args.batch_size, tmp)
        sqlite = commit_rate(f"sqlite:///{tmp / 'commit.db'}", args.commit_rows, args.commit_batch)
        sqlite["bytes_per_row"] = round(os.path.getsize(tmp / "commit.db") / args.commit_rows)
        result["commit"]["sqlite"] = sqlite
        print(f"commit sqlite: {sqlite['rows_per_s']} rows/s ({sqlite['bytes_per_row']} bytes per row with its 512-d vector)")
        pg = postgres_commit_rate(args.commit_rows, args.commit_batch)
        if pg:
            result["commit"]["postgresql"] = pg
            print(f"commit postgresql: {pg['rows_per_s']} rows/s")
    result["load_average_at_end"] = load_average()
    write_json("bench_ray.json", result)


if __name__ == "__main__":
    main()
