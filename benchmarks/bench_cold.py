"""Cold query from the shell, side by side: `loupe search` against rclip's, same photos, one run.

    .venv/bin/python benchmarks/bench_cold.py              # N=5 rounds
    .venv/bin/python benchmarks/bench_cold.py --rounds 3   # quicker

rclip (PyPI `rclip==3.3.0`, ONNX Runtime, no torch) is installed into its own venv under
benchmarks/out/rclip/ (made once), with a random-weight open_clip `ViT-B-32-256` exported to the
ONNX layout it expects (`ViT-B-32-256-datacomp_s34b_b86k/{visual,textual}.onnx` and open_clip's BPE
file under `$RCLIP_DATADIR`), so it runs offline; it indexes the 800 flickr8k photos once. loupe
indexes the same photos with a random-weight ViT-B-32 (speed does not depend on the weights).
Then, alternating, each round times one fresh process of each:

- rclip: `rclip --no-indexing -t 10 "<sentence>"` in the photos folder;
- loupe: `loupe search -k 10 "<sentence>"` (no server), a sentence not asked before (no cache hit);
  checked to import none of torch, open_clip, SQLAlchemy, FAISS and typer (`--timings`).

Also timed: loupe's first-ever query on the index (no text tower cached yet: torch loads, the
tower is exported after the results are printed), and a repeated sentence (query-cache hit).
Prints medians, ranges and the loupe/rclip ratio; writes benchmarks/out/bench_cold.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import FLICKR, OUT, PYTHON, checkpoint, load_average, machine, median, run_loupe, write_json

RCLIP_VERSION = "3.3.0"
RCLIP_MODEL_DIR = "ViT-B-32-256-datacomp_s34b_b86k"
QUERIES = [
    "a dog running on the grass", "children playing in the snow", "a man riding a bike", "two people on a beach",
    "a girl in a pink dress", "a black and white dog jumping", "a boy jumping into a pool", "people in a city street",
    "a surfer riding a wave", "a brown dog with a ball", "a climber on a rock", "a crowd at a concert",
]


def rclip_venv(root: Path) -> Path:
    """rclip's own venv (python3 -m venv; pip install rclip==3.3.0), made once."""
    venv = root / "venv"
    exe = venv / "bin" / "rclip"
    if not exe.exists():
        print(f"installing rclip {RCLIP_VERSION} into {venv} ...", flush=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"rclip=={RCLIP_VERSION}"], check=True)
    return exe


def rclip_model(datadir: Path) -> None:
    """A random-weight ViT-B-32-256 in rclip's ONNX layout (opset 18, input 'input', dynamic batch), made once."""
    folder = datadir / RCLIP_MODEL_DIR
    bpe = datadir / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    if (folder / "visual.onnx").exists() and (folder / "textual.onnx").exists() and bpe.exists():
        return
    print("exporting a random-weight ViT-B-32-256 for rclip ...", flush=True)
    import warnings

    import open_clip
    import torch

    from loupe.indexer.models.clip_tokenizer import default_bpe_path

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-256", pretrained=None).eval()

    class Tower(torch.nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.model, self.fn = model, fn

        def forward(self, x):
            return getattr(self.model, self.fn)(x)

    folder.mkdir(parents=True, exist_ok=True)
    bpe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(default_bpe_path(), bpe)
    examples = {
        "visual": (Tower("encode_image"), torch.zeros(1, 3, 256, 256)),
        "textual": (Tower("encode_text"), open_clip.get_tokenizer("ViT-B-32-256")(["a photo"])),
    }
    for name, (tower, example) in examples.items():
        tmp = folder / f".{name}.onnx.tmp"
        with warnings.catch_warnings():  # with grad enabled: no fused attention kernel, which ONNX lacks
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, (example,), str(tmp), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=18, dynamo=False)
        os.replace(tmp, folder / f"{name}.onnx")


def rclip_env(datadir: Path) -> dict:
    return dict(os.environ, RCLIP_DATADIR=str(datadir), HF_HUB_OFFLINE="1")


def run_rclip(exe: Path, datadir: Path, args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run([str(exe), *args], cwd=FLICKR, env=rclip_env(datadir), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"rclip {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall, proc


def timings(proc: subprocess.CompletedProcess) -> dict:
    """The JSON line `loupe search --timings` prints last on stderr."""
    for line in reversed(proc.stderr.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def spread(xs: list[float]) -> dict:
    return {"median": round(median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3), "runs": [round(x, 3) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--setup-only", action="store_true", help="Install rclip, export its model, index both; time nothing.")
    args = ap.parse_args()
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, load {info['load_average_at_start']}", flush=True)

    root = OUT / "rclip"
    datadir = root / "data"
    exe = rclip_venv(root)
    rclip_model(datadir)
    print("rclip: indexing the 800 photos (incremental: only the first run embeds) ...", flush=True)
    wall, _ = run_rclip(exe, datadir, ["-f", "-t", "3", "a photo"])
    print(f"rclip: index up to date after {wall:.1f}s", flush=True)

    home = OUT / "cold-home"
    print("loupe: indexing the 800 photos (incremental) ...", flush=True)
    wall, _ = run_loupe(["index", FLICKR, "--checkpoint", checkpoint("ViT-B-32")], home, LOUPE_TEXT_TOWER="0")
    print(f"loupe: index up to date after {wall:.1f}s", flush=True)
    if args.setup_only:
        return
    for path in home.glob("text-*"):  # no text tower, no cached query: as right after `loupe index`
        path.unlink()
    (home / "query-cache.sqlite").unlink(missing_ok=True)

    # loupe's first-ever query: torch loads; the tower is exported after the results are out
    first_wall, proc = run_loupe(["search", "-k", "10", "--timings", "a photo of a dog"], home)
    first = timings(proc)
    manifest = json.loads((home / "text-tower.json").read_text())
    print(f"loupe first-ever query: results after {first['seconds']:.2f}s in process, process exits after "
          f"{first_wall:.2f}s (text tower exported in {manifest['export_seconds']:.1f}s, usable={manifest['usable']})", flush=True)

    rclip_runs, loupe_runs, loupe_inproc = [], [], []
    for i in range(args.rounds):
        query = QUERIES[i % len(QUERIES)]
        r_wall, _ = run_rclip(exe, datadir, ["--no-indexing", "-t", "10", query])
        l_wall, proc = run_loupe(["search", "-k", "10", "--timings", query], home)
        t = timings(proc)
        assert t.get("text_encoder") == "onnx" and t.get("encoded") == 1 and not t.get("heavy_imports"), t
        rclip_runs.append(r_wall)
        loupe_runs.append(l_wall)
        loupe_inproc.append(t["seconds"])
        print(f"round {i + 1}: rclip {r_wall:.3f}s  loupe {l_wall:.3f}s  ({query!r})", flush=True)

    repeat_runs = []
    for _ in range(max(2, args.rounds // 2)):
        wall, proc = run_loupe(["search", "-k", "10", "--timings", QUERIES[0]], home)
        t = timings(proc)
        assert t.get("cache_hits") == 1 and t.get("encoded") == 0 and t.get("onnx_sessions") == 0, t
        repeat_runs.append(wall)

    out = {
        "machine": info,
        "load_average_at_end": load_average(),
        "photos": 800,
        "rclip": {"version": RCLIP_VERSION, "model": "ViT-B-32-256 (random weights, ONNX)", "cold_query_s": spread(rclip_runs)},
        "loupe": {
            "model": "ViT-B-32 (random weights)",
            "cold_query_s": spread(loupe_runs),
            "in_process_s": spread(loupe_inproc),
            "repeated_query_s": spread(repeat_runs),
            "first_query": {"results_after_s": first["seconds"], "process_wall_s": round(first_wall, 3),
                            "tower_export_s": manifest["export_seconds"]},
        },
        "ratio_loupe_over_rclip": round(median(loupe_runs) / median(rclip_runs), 3),
    }
    r, l, rep = out["rclip"]["cold_query_s"], out["loupe"]["cold_query_s"], out["loupe"]["repeated_query_s"]
    print(f"\ncold query, median of {args.rounds} (range), whole processes:")
    print(f"  rclip {RCLIP_VERSION}        {r['median']:.3f}s ({r['min']:.3f}-{r['max']:.3f})")
    print(f"  loupe (ONNX tower)  {l['median']:.3f}s ({l['min']:.3f}-{l['max']:.3f})  ratio loupe/rclip {out['ratio_loupe_over_rclip']:.2f}")
    print(f"  loupe repeated      {rep['median']:.3f}s ({rep['min']:.3f}-{rep['max']:.3f})  (query-cache hit)")
    print(f"  loupe first-ever    {first_wall:.3f}s to exit, results after {first['seconds']:.2f}s in process")
    print(f"load average at end {out['load_average_at_end']}")
    write_json("bench_cold.json", out)


if __name__ == "__main__":
    sys.exit(main())
