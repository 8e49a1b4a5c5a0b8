"""Image tower backends and loupe against rclip, side by side in one run (issue 19).

    .venv/bin/python benchmarks/bench_backends.py                       # 800 flickr8k + 200 photos at 12 MP
    .venv/bin/python benchmarks/bench_backends.py --small 400 --large 100 --rounds 1   # a loaded machine

Needs rclip's venv and model, made once by `benchmarks/bench_cold.py --setup-only`.
1. Encoder alone, ViT-B-32 on ready tensors, in this process, alternating: torch fp32, torch with
   bf16 weights, ONNX Runtime fp32 (loupe's exported tower). Images per wall second and per CPU
   second (process time of all threads: steadier than wall time on a shared machine).
2. Whole processes into fresh indexes, alternating per round: rclip 3.3.0 (`rclip -f` in the
   folder, its database removed first), `loupe index` (default: the backend `auto` chooses) and
   `loupe index --no-ocr` (rclip's work: no text read in the photos) and `loupe index --backend
   torch --no-ocr`, on the flickr8k photos and on 4000x3000 JPEGs made from them.
   Rates are photos per second of the whole command (wall) and per CPU second of the child
   process (rusage); for a run that reads text (the default), also the rate at which every photo
   is searchable by meaning (the command's wall time less its text pass, which comes after).
   loupe's fixed cost is its wall time outside its own indexing report (start to first photo,
   plus everything after the last); then a no-change re-run. The default on a CPU with bf16 units
   embeds a run of 200 photos or more with torch bf16 weights (`factory.bulk_spec`).
3. Cold query: `loupe search` (no server) against `rclip --no-indexing`, alternating, a new
   sentence each time (nothing cached), median of --queries.
The load average is printed beside every figure. Writes benchmarks/out/bench_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

from bench_cold import RCLIP_MODEL_DIR, rclip_env
from bench_index import make_large
from common import FLICKR, OUT, PYTHON, REPO, checkpoint, load_average, load_checkpoint, loupe_env, machine, median, write_json

SENTENCES = [
    "an old man feeding pigeons in a square", "a kayak on a calm green lake", "a baby laughing in a high chair",
    "two horses behind a wooden fence", "a woman reading under a tree", "a skateboarder in an empty pool",
    "fireworks over a harbour at night", "a red tractor in a muddy field", "a cat asleep on a windowsill",
    "a marching band in the rain", "three kids on a seesaw", "a lighthouse on a rocky coast",
]


def child_run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


def encoder_alone(n: int, batch: int, rounds: int) -> dict:
    import numpy as np
    import torch

    from loupe.indexer.models.image_tower import load_tower, probe_pixels
    from loupe.indexer.models.precision import lowered

    enc = load_checkpoint(checkpoint("ViT-B-32"))
    tower = load_tower(enc)
    visual = enc.model.visual
    bf16 = lowered(visual, "bf16")
    x = torch.from_numpy(probe_pixels(enc.image_size, batch))
    runs = {
        "torch fp32": lambda: visual(x),
        "torch bf16 weights": lambda: bf16(x.to(torch.bfloat16)),
        "onnx fp32": lambda: tower.encode(x.numpy()),
    }
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(visual(x), dim=-1).numpy()
        cos = {
            "torch bf16 weights": float(np.min(np.sum(torch.nn.functional.normalize(bf16(x.to(torch.bfloat16)).float(), dim=-1).numpy() * ref, 1))),
            "onnx fp32": float(np.min(np.sum(tower.encode(x.numpy()) * ref, 1))),
        }
        out = {k: [] for k in runs}
        for r in range(rounds):
            for name, fn in runs.items():
                load = load_average()
                fn()  # warm
                w, c = time.perf_counter(), time.process_time()
                for _ in range(max(1, n // batch)):
                    fn()
                wall, cpu = time.perf_counter() - w, time.process_time() - c
                imgs = max(1, n // batch) * batch
                out[name].append({"wall_rate": round(imgs / wall, 2), "cpu_rate": round(imgs / cpu, 2), "load": load})
                print(f"  encoder alone #{r + 1} {name:20s} {imgs / wall:6.1f} img/s wall, {imgs / cpu:6.1f} img/CPU-s  load {load}", flush=True)
    summary = {k: {"wall_rate": median([v["wall_rate"] for v in vs]), "cpu_rate": median([v["cpu_rate"] for v in vs]), "runs": vs}
               for k, vs in out.items()}
    for k, c in cos.items():
        summary[k]["min_cosine_to_torch_fp32"] = round(c, 6)
    base = summary["torch fp32"]
    for k in summary:
        summary[k]["cpu_vs_torch_fp32"] = round(summary[k]["cpu_rate"] / base["cpu_rate"], 2)
    return summary


def run_rclip_index(folder: Path, datadir: Path, exe: Path) -> dict:
    (datadir / "db.sqlite3").unlink(missing_ok=True)  # a fresh index; the model stays
    load = load_average()
    wall, cpu, _ = child_run([str(exe), "-f", "-t", "3", "a photo"], folder, rclip_env(datadir))
    return {"wall": round(wall, 2), "cpu": round(cpu, 2), "load": load}


def run_loupe_index(folder: Path, home: Path, ckpt: Path, extra: list[str]) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    load = load_average()
    cmd = [PYTHON, "-m", "loupe", "index", str(folder), "--checkpoint", str(ckpt), "--json", *extra]
    wall, cpu, proc = child_run(cmd, REPO, loupe_env(home))
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    again_wall, again_cpu, _ = child_run(cmd, REPO, loupe_env(home))  # nothing changed
    return {
        "wall": round(wall, 2), "cpu": round(cpu, 2), "load": load, "embedded": report["embedded"],
        "index_seconds": report["seconds"], "precision": report.get("precision"),
        "text_pass_seconds": report.get("deferred_seconds"),
        # start to first photo plus everything after the last: the model's load happens inside the run's report
        "fixed_cost": round(wall - report["seconds"] + report.get("model_seconds", 0.0), 2),
        "model_seconds": round(report.get("model_seconds", 0.0), 2), "no_change_wall": round(again_wall, 2),
        "stderr": proc.stderr.strip()[-300:],
    }


def indexing(name: str, folder: Path, n: int, rounds: int, exe: Path, datadir: Path, ckpt: Path, work: Path) -> dict:
    systems = {
        "rclip": lambda: run_rclip_index(folder, datadir, exe),
        "loupe (default)": lambda: run_loupe_index(folder, work / f"home-{name}-default", ckpt, []),
        # rclip's work exactly (no text read in the photos): the same default backend
        "loupe --no-ocr": lambda: run_loupe_index(folder, work / f"home-{name}-no-ocr", ckpt, ["--no-ocr"]),
        "loupe --backend torch --no-ocr": lambda: run_loupe_index(folder, work / f"home-{name}-torch", ckpt, ["--backend", "torch", "--no-ocr"]),
    }
    rows = {k: [] for k in systems}
    for r in range(rounds):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for k in order:
            row = systems[k]()
            row["wall_rate"], row["cpu_rate"] = round(n / row["wall"], 2), round(n / row["cpu"], 2)
            if row.get("text_pass_seconds"):  # every photo is searchable by meaning before the text pass starts
                row["searchable_rate"] = round(n / (row["wall"] - row["text_pass_seconds"]), 2)
            rows[k].append(row)
            extra = f", fixed cost {row['fixed_cost']} s, no-change re-run {row['no_change_wall']} s" if "fixed_cost" in row else ""
            if "searchable_rate" in row:
                extra += f", searchable at {row['searchable_rate']} img/s (text pass {row['text_pass_seconds']:.1f} s)"
            print(f"  {name} #{r + 1} {k:30s} {row['wall_rate']:6.2f} img/s wall, {row['cpu_rate']:6.2f} img/CPU-s "
                  f"({row['wall']} s){extra}  load {row['load']}", flush=True)
    out = {k: {"wall_rate": median([x["wall_rate"] for x in v]), "cpu_rate": median([x["cpu_rate"] for x in v]), "runs": v}
           for k, v in rows.items()}
    for k, v in rows.items():
        if all("searchable_rate" in x for x in v):
            out[k]["searchable_rate"] = median([x["searchable_rate"] for x in v])
            out[k]["searchable_vs_rclip"] = round(out[k]["searchable_rate"] / out["rclip"]["wall_rate"], 2)
    for k in out:
        out[k]["wall_vs_rclip"] = round(out[k]["wall_rate"] / out["rclip"]["wall_rate"], 2)
        out[k]["cpu_vs_rclip"] = round(out[k]["cpu_rate"] / out["rclip"]["cpu_rate"], 2)
    return {"photos": n, "folder": str(folder), "systems": out}


def cold_queries(home: Path, exe: Path, datadir: Path, n: int) -> dict:
    loupe_runs, rclip_runs = [], []
    for i, sentence in enumerate(SENTENCES[:n]):
        pair = [("loupe", lambda: child_run([PYTHON, "-m", "loupe", "search", "-k", "10", sentence], REPO, loupe_env(home))),
                ("rclip", lambda: child_run([str(exe), "--no-indexing", "-t", "10", sentence], FLICKR, rclip_env(datadir)))]
        for name, fn in (pair if i % 2 == 0 else pair[::-1]):
            load = load_average()
            wall, cpu, _ = fn()
            (loupe_runs if name == "loupe" else rclip_runs).append({"wall": round(wall, 3), "cpu": round(cpu, 3), "load": load})
            print(f"  cold query #{i + 1} {name}: {wall:.3f} s wall, {cpu:.3f} CPU-s  load {load}  ({sentence!r})", flush=True)
    lw, rw = median([x["wall"] for x in loupe_runs]), median([x["wall"] for x in rclip_runs])
    lc, rc = median([x["cpu"] for x in loupe_runs]), median([x["cpu"] for x in rclip_runs])
    return {"loupe": loupe_runs, "rclip": rclip_runs, "loupe_median_wall": lw, "rclip_median_wall": rw,
            "ratio_wall": round(lw / rw, 3), "ratio_cpu": round(lc / rc, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=800, help="flickr8k photos (at most 800)")
    ap.add_argument("--large", type=int, default=200, help="photos at 4000x3000 (0: skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--encoder-images", type=int, default=64)
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loupe-bench-backends"))
    a = ap.parse_args()
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, bf16 units {info['bf16_units']}, load {info['load_average_at_start']}", flush=True)
    root = OUT / "rclip"
    exe, datadir = root / "venv" / "bin" / "rclip", root / "data"
    if not exe.exists() or not (datadir / RCLIP_MODEL_DIR / "visual.onnx").exists():
        raise SystemExit("rclip is not set up: run benchmarks/bench_cold.py --setup-only first")
    ckpt = checkpoint("ViT-B-32")
    out: dict = {"machine": info}
    if not a.skip_encoder:
        print("1. the image tower alone (ViT-B-32, batch 32, ready tensors):", flush=True)
        out["encoder_alone"] = encoder_alone(a.encoder_images, 32, a.rounds)
    a.workdir.mkdir(parents=True, exist_ok=True)
    small = a.workdir / "small"
    if not (small.exists() and len(list(small.iterdir())) == a.small):
        shutil.rmtree(small, ignore_errors=True)
        small.mkdir()
        for p in sorted(FLICKR.iterdir())[: a.small]:
            os.symlink(p, small / p.name)
    # the towers are exported once per model (user cache): a first use pays it, later indexes do not
    warm = a.workdir / "warm"
    shutil.rmtree(warm, ignore_errors=True)
    warm.mkdir()
    for p in sorted(FLICKR.iterdir())[:4]:
        os.symlink(p, warm / p.name)
    load = load_average()
    wall, cpu, _ = child_run([PYTHON, "-m", "loupe", "index", str(warm), "--checkpoint", str(ckpt)], REPO,
                             loupe_env(a.workdir / "home-warm"))
    shutil.rmtree(a.workdir / "home-warm", ignore_errors=True)
    out["first_use_of_model_s"] = {"wall": round(wall, 2), "cpu": round(cpu, 2), "load": load}
    print(f"first use of the model (towers exported unless cached): {wall:.1f} s wall, load {load}", flush=True)
    print(f"2. whole processes, fresh indexes, {a.rounds} alternating rounds:", flush=True)
    out["small"] = indexing("small", small, a.small, a.rounds, exe, datadir, ckpt, a.workdir)
    if a.large:
        large = a.workdir / "large"
        make_large(FLICKR, large, a.large)
        out["large"] = indexing("12MP", large, a.large, a.rounds, exe, datadir, ckpt, a.workdir)
    print(f"3. cold query, median of {a.queries} alternating new sentences:", flush=True)
    home = a.workdir / "home-small-default"
    run_rclip_index(small, datadir, exe)  # rclip's index of the same photos
    out["cold_query"] = cold_queries(home, exe, datadir, a.queries)
    out["load_average_at_end"] = load_average()
    write_json("bench_backends.json", out)
    print("\nsummary (median):")
    for size in ("small", "large"):
        if size in out:
            for k, v in out[size]["systems"].items():
                searchable = f"; searchable {v['searchable_rate']} img/s ({v['searchable_vs_rclip']}x)" if "searchable_rate" in v else ""
                print(f"  {size:5s} {k:30s} {v['wall_rate']:6.2f} img/s wall ({v['wall_vs_rclip']}x rclip), "
                      f"{v['cpu_rate']:6.2f} img/CPU-s ({v['cpu_vs_rclip']}x rclip){searchable}")
    c = out["cold_query"]
    print(f"  cold query: loupe {c['loupe_median_wall']:.3f} s, rclip {c['rclip_median_wall']:.3f} s, ratio {c['ratio_wall']} "
          f"(CPU ratio {c['ratio_cpu']}); load at end {out['load_average_at_end']}")


if __name__ == "__main__":
    main()
