"""An index larger than memory: build from npy shards with bounded RSS, then recall and latency.

Stages (each in its own process, so each peak RSS is its own):
  1. generate: N synthetic CLIP-like image vectors (indexer/storage/synthetic.py) written as
     clip-retrieval shards (img_emb/img_emb_N.npy, float16 by default, metadata parquet);
  2. build: `loupe.indexer.storage.ondisk.build.build_ondisk` (IVF trained on a sample, shard-by-shard add,
     merged on-disk inverted lists); reports stage times, disk size and peak RSS (VmHWM);
  3. query: text-like queries against the memory-mapped index with exact re-ranking from the
     memory-mapped shards, one query at a time (p50/p95 latency), and recall@10 against exact
     brute force over every row of the shards (the named baseline, also timed).

    .venv/bin/python benchmarks/bench_ondisk.py --n 10000000            # the issue's target
    .venv/bin/python benchmarks/bench_ondisk.py --n 200000 --queries 100 # a quick run

Writes benchmarks/out/ondisk-<N>.json. Shards and index go to --work (default
benchmarks/out/ondisk-<N>/); 10M x 512 float16 shards take 10 GB, the index ~0.8 GB.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import OUT, load_average  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), mapped file pages included."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def generate(args) -> dict:
    import numpy as np

    from loupe.indexer.interop.shards import IMG, ShardWriter
    from loupe.indexer.storage.synthetic import ClipLike

    t = time.perf_counter()
    world = ClipLike(dim=args.dim, spread=args.spread)
    writer = ShardWriter(Path(args.work) / "shards", args.n, args.dim, dtype=args.dtype, shard_size=args.shard_size)
    chunk = 100_000
    for n, start in enumerate(range(0, args.n, chunk)):
        m = min(chunk, args.n - start)
        vecs = world.images(m, seed=1000 + n)
        writer.add({IMG: vecs}, {"image_path": [f"/synthetic/{i:09d}.jpg" for i in range(start, start + m)]})
    shards = writer.close()
    return {"seconds": time.perf_counter() - t, "shards": len(shards), "peak_rss_bytes": peak_rss_bytes()}


def build(args) -> dict:
    import faiss

    from loupe.indexer.storage.ondisk.build import build_ondisk, report_dict

    faiss.omp_set_num_threads(args.threads)
    out = Path(args.work) / "index"
    shutil.rmtree(out, ignore_errors=True)
    report = build_ondisk(Path(args.work) / "shards", out, factory=args.factory or None, progress=lambda m: print(m, flush=True))
    return {**report_dict(report), "peak_rss_bytes": peak_rss_bytes()}


def query(args) -> dict:
    import faiss
    import numpy as np

    from loupe.indexer.storage.ondisk.search import OnDiskIndex, exact_search
    from loupe.indexer.storage.ondisk.sources import ShardSet
    from loupe.indexer.storage.synthetic import ClipLike

    faiss.omp_set_num_threads(args.threads)
    queries = ClipLike(dim=args.dim, spread=args.spread).texts(args.queries, seed=7)
    shards = ShardSet.scan(Path(args.work) / "shards")
    t = time.perf_counter()
    _, truth = exact_search(shards, queries, 10)
    exact_s = time.perf_counter() - t
    index = OnDiskIndex(Path(args.work) / "index")
    out = {"exact_brute_force_seconds": exact_s, "exact_ms_per_query": 1000 * exact_s / len(queries), "nlist": index.ivf.nlist, "runs": []}
    for nprobe in args.nprobe:
        for rerank in args.rerank:
            index.nprobe, index.rerank = nprobe, rerank
            index.search(queries[:5], 10)  # warm the mapping of the coarse quantizer
            times, found = [], []
            for q in queries:
                t = time.perf_counter()
                _, ids = index.search(q, 10)
                times.append(time.perf_counter() - t)
                found.append(ids[0])
            recall = float(np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth)]))
            run = {
                "nprobe": nprobe, "rerank": rerank, "recall_at_10": round(recall, 4),
                "p50_ms": round(1000 * float(np.median(times)), 2), "p95_ms": round(1000 * float(np.percentile(times, 95)), 2),
            }
            print(json.dumps(run), flush=True)
            out["runs"].append(run)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--shard-size", type=int, default=1_000_000)
    ap.add_argument("--spread", type=float, default=1.5, help="synthetic content noise (bench_query.py's harder default; 1.2: more clustered)")
    ap.add_argument("--factory", default="", help="FAISS factory (default: loupe.indexer.storage.ondisk.layout.auto_factory)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--rerank", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="")
    ap.add_argument("--keep", action="store_true", help="keep shards and index (default: delete them at the end)")
    ap.add_argument("--reuse-shards", action="store_true", help="use the shards already in --work (same N, dim, spread)")
    ap.add_argument("--stage", choices=["generate", "build", "query"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or str(OUT / f"ondisk-{args.n}")
    if args.stage:
        print("RESULT " + json.dumps({"generate": generate, "build": build, "query": query}[args.stage](args)), flush=True)
        return

    from benchmarks.common import machine

    result = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "stage"}, "stages": {}}
    print(f"on-disk index: {args.n} x {args.dim} {args.dtype}, work in {args.work}; load {load_average()}", flush=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for stage in ("generate", "build", "query"):
        if stage == "generate" and (Path(args.work) / "shards").exists():
            if args.reuse_shards:
                print("generate: reusing the shards in --work", flush=True)
                result["stages"]["generate"] = {"reused": True}
                continue
            shutil.rmtree(Path(args.work) / "shards")
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--stage", stage] + [a for a in sys.argv[1:]]
        cmd += ["--work", args.work]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
        result["stages"][stage] = json.loads(line[len("RESULT "):])
        result["stages"][stage]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(f"{stage}: {json.dumps(result['stages'][stage])[:1500]}", flush=True)
    result["shards_bytes"] = disk_bytes(Path(args.work) / "shards")
    result["index_bytes"] = disk_bytes(Path(args.work) / "index")
    result["load_average_at_end"] = load_average()
    b = result["stages"]["build"]
    q = result["stages"]["query"]
    print(
        f"\nbuild {args.n} x {args.dim}: {b['seconds']['total']:.0f} s ({b['factory']}), peak RSS "
        f"{b['peak_rss_bytes'] / 2**30:.2f} GiB, index {result['index_bytes'] / 2**30:.2f} GiB on disk "
        f"(shards {result['shards_bytes'] / 2**30:.2f} GiB); exact brute force {q['exact_ms_per_query']:.0f} ms/query"
    )
    for run in q["runs"]:
        print(f"  nprobe {run['nprobe']:>4} rerank {run['rerank']:>4}: recall@10 {run['recall_at_10']:.4f}, p50 {run['p50_ms']} ms, p95 {run['p95_ms']} ms")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"ondisk-{args.n}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
