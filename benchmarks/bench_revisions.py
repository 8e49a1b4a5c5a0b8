"""Two revisions of loupe side by side in one run: the speed benchmarks of each, alternating.

    .venv/bin/python benchmarks/bench_revisions.py --before 79800a5            # cold, index, page; 2 rounds
    .venv/bin/python benchmarks/bench_revisions.py --before 79800a5 --only cold --rounds 3

The "before" tree is extracted with `git archive` beside this checkout (../loupe-rev-<commit>) and runs its
own benchmark scripts with its own code (on PYTHONPATH, with this venv's packages); "after" is this
checkout. Both share benchmarks/out/models (random-weight checkpoints) and out/rclip (rclip's venv
and its exported model), so rclip is the same program in both. Each round runs every selected
benchmark once per tree, the tree order alternating between rounds, so drift in the machine's load
hits both alike. Benchmarks and the figures taken from their JSON:

- cold:  bench_cold.py --rounds 3   -> loupe's cold `loupe search` median, rclip's, their ratio
- index: bench_index.py --large 0 --repeats 1 -> `loupe index` img/s on flickr8k_800, the bare encoder's, their ratio
- page:  bench_page.py --queries 10 -> Enter -> first row painted at 100k vectors (cached / on the fly), ms

Prints each figure's median over rounds for both trees and after/before; writes
benchmarks/out/bench_revisions.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from common import OUT, PYTHON, REPO, compile_bytecode, load_average, machine, median, write_json

BENCHES = {
    "cold": (["bench_cold.py", "--rounds", "3"], "bench_cold.json", {
        "loupe cold search s": ("loupe", "cold_query_s", "median"),
        "rclip cold search s": ("rclip", "cold_query_s", "median"),
        "loupe/rclip": ("ratio_loupe_over_rclip",),
    }),
    "index": (["bench_index.py", "--large", "0", "--repeats", "1"], "bench_index.json", {
        "loupe index img/s": ("runs", "flickr8k_800", "loupe_median"),
        "bare encoder img/s": ("runs", "flickr8k_800", "bare_median"),
        "loupe/bare": ("runs", "flickr8k_800", "loupe_vs_bare"),
    }),
    "page": (["bench_page.py", "--queries", "10", "--thumb-repeats", "1"], "bench_page.json", {
        "first row, cached ms": ("page", "cached", "median_ms"),
        "first row, on the fly ms": ("page", "on_the_fly", "median_ms"),
    }),
}


def extract(ref: str) -> tuple[str, Path]:
    """`ref`'s tree beside this checkout (`../loupe-rev-<commit>`, so its scripts find ../shared as ours
    do), its benchmarks/out/ sharing models and rclip with ours."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = REPO.parent / f"loupe-rev-{commit}"
    if not tree.exists():
        data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tree, filter="data")
    out = tree / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    for shared in ("models", "rclip"):
        (OUT / shared).mkdir(parents=True, exist_ok=True)
        link = out / shared
        if not link.exists():
            link.symlink_to(OUT / shared, target_is_directory=True)
    return commit, tree


def run(tree: Path, bench: str, before: bool) -> dict:
    args, json_name, _ = BENCHES[bench]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if before:  # the old tree's modules first on the path; the installed loupe is this checkout's
        env["PYTHONPATH"] = str(tree)
    proc = subprocess.run([PYTHON, str(tree / "benchmarks" / args[0]), *args[1:]], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{bench} in {tree} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((tree / "benchmarks" / "out" / json_name).read_text())


def pick(data: dict, path: tuple) -> float:
    for key in path:
        data = data[key]
    return float(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="the revision to compare this checkout with")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="cold,index,page", help="comma-separated: " + ",".join(BENCHES))
    a = ap.parse_args()
    benches = [b for b in a.only.split(",") if b]
    commit, old = extract(a.before)
    trees = {"before": old, "after": REPO}
    for tree in trees.values():  # both trees run from compiled modules, as installed packages do
        compile_bytecode(tree)
    figures: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    out = {"machine": machine(), "before": commit, "after": "working tree", "load_before": load_average(), "runs": []}
    print(f"{out['machine'].get('cpu')}, {out['machine'].get('cores')} cores; before = {commit}, after = this checkout", flush=True)
    for r in range(a.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for bench in benches:
            for name in order:
                data = run(trees[name], bench, before=name == "before")
                row = {label: pick(data, path) for label, path in BENCHES[bench][2].items()}
                out["runs"].append({"round": r + 1, "tree": name, "bench": bench, **row})
                for label, value in row.items():
                    figures[name].setdefault(label, []).append(value)
                print(f"round {r + 1} {bench:5s} {name:6s} " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    out["load_after"] = load_average()
    out["medians"] = {}
    print(f"\nmedians over {a.rounds} rounds (load {out['load_before']} -> {out['load_after']}):")
    print(f"{'figure':28s} {'before':>10s} {'after':>10s} {'after/before':>13s}")
    for label in figures["after"]:
        b, f = median(figures["before"][label]), median(figures["after"][label])
        out["medians"][label] = {"before": round(b, 4), "after": round(f, 4), "after_over_before": round(f / b, 3)}
        print(f"{label:28s} {b:10.3f} {f:10.3f} {f / b:13.2f}")
    write_json("bench_revisions.json", out)


if __name__ == "__main__":
    sys.exit(main())
