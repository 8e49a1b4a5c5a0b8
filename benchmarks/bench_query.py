"""Query speed and ANN recall: cold `loupe search`, bare model load, warm `loupe serve` latency.

    .venv/bin/python benchmarks/bench_query.py                         # 10k, 100k, 1M vectors
    .venv/bin/python benchmarks/bench_query.py --sizes 10000 --repeats 3   # quick

For each size, a catalog bound to ViT-B-32 (random weights: same speed as the pretrained
model) is filled with CLIP-like synthetic image vectors (indexer/storage/synthetic.py: the modality
gap and a topic structure) and the vector index is built exactly as `loupe index` builds it
(size-chosen factory). Measured, side by side in one run:

- cold: wall time of `loupe search "..."` from the shell, against the bare import + model
  load (`import open_clip; create_model_and_transforms(...)`, also a fresh process), medians;
- warm: per-query latency through `loupe serve` (HTTP round trip, text encoding, ANN search,
  exact re-scoring, catalog look-ups), over distinct real captions;
- recall@10 of the index `loupe` built against exact search, for text-like queries (the other
  side of the gap) and, for contrast, image-like queries; plus a comparison of index kinds at
  the smallest size >= 100k, including PQ without re-ranking;
- 100 batched flat queries with faiss' default `distance_compute_blas_threshold` and loupe's.
Writes benchmarks/out/bench_query.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from common import CAPTIONS, PYTHON, REPO, size_sweep_parser, checkpoint, load_average, load_checkpoint, loupe_env, machine, median, run_loupe, start_serve, stop_serve, write_json

from loupe.indexer.storage.synthetic import ClipLike, insert_images, stats

BARE = (
    "import open_clip\n"
    "open_clip.create_model_and_transforms('ViT-B-32', pretrained={ckpt!r})\n"
    "open_clip.get_tokenizer('ViT-B-32')\n"
)


# What people type into a search box: 2-6 words (the caption set below is the long-sentence case).
SHORT_QUERIES = [
    "a dog on the beach", "children playing in the snow", "a man riding a bike", "sunset over the sea",
    "a red car", "people at a concert", "a cat sleeping", "mountain lake", "two dogs running",
    "a girl with a balloon", "surfer on a wave", "birthday cake", "a black and white dog in the grass",
    "skateboarder doing a trick", "crowd in the street", "a boy jumping into a pool", "old building",
    "a woman in a red dress", "football game", "snowy forest", "a horse in a field", "kids at the park",
    "a man climbing a rock", "wedding photo", "dog catching a frisbee", "city at night", "a baby smiling",
    "people hiking", "a bird on a branch", "boat on a river",
]


def captions(n: int) -> list[str]:
    data = json.loads(CAPTIONS.read_text())
    return [c for item in data for c in item["captions"]][:n]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def exact_top(queries: np.ndarray, base: np.ndarray, ids: np.ndarray, k: int = 10) -> np.ndarray:
    import faiss

    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    _, pos = flat.search(np.ascontiguousarray(queries), k)
    return ids[pos]


def build_home(n: int, workdir: Path, encoder, world: ClipLike) -> tuple[Path, np.ndarray, np.ndarray]:
    """A loupe home with `n` synthetic image vectors, bound to the benchmark's ViT-B-32 (reused if built)."""
    from loupe.indexer.storage.catalog import IMAGE
    from loupe.indexer.storage.store import Store

    home = workdir / f"query-{n}"
    images = world.images(n)
    marker = home / "built"
    built = marker.exists() and marker.read_text() == f"spread={world.spread} seed={world.seed}"
    store = Store.open(home=home) if built else None
    if store is None:
        shutil.rmtree(home, ignore_errors=True)
        store = Store.open(home=home)
        store.bind(encoder)
        t = time.perf_counter()
        insert_images(store, images)
        print(f"  {n}: catalog filled in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        store.sync_all()
        print(f"  {n}: vector index built in {time.perf_counter() - t:.1f} s")
        marker.write_text(f"spread={world.spread} seed={world.seed}")
    ids = store.catalog.vector_ids(IMAGE)
    return home, images, np.sort(ids)


def cold(home: Path, repeats: int, ckpt: Path, query: str) -> dict:
    """Interleaved fresh-process timings of `loupe search` and of the bare model load."""
    bare_code = BARE.format(ckpt=str(ckpt))
    searches, bares = [], []
    run_loupe(["search", query, "-k", "10"], home)  # page cache warm, as on a machine in use
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([PYTHON, "-c", bare_code], cwd=REPO, env=loupe_env(), check=True, capture_output=True)
        bares.append(time.perf_counter() - t)
        wall, _ = run_loupe(["search", query, "-k", "10"], home)
        searches.append(wall)
    return {
        "search_wall_seconds": [round(x, 3) for x in searches],
        "bare_import_load_seconds": [round(x, 3) for x in bares],
        "search_median": round(median(searches), 3),
        "bare_median": round(median(bares), 3),
        "ratio": round(median(searches) / median(bares), 3),
    }


def warm(home: Path, sentences: list[str]) -> dict:
    """Latency of text->image queries through a running `loupe serve` (HTTP from this process)."""
    from loupe.retrieval.web.client import request

    proc, state = start_serve(home)
    try:
        times: dict[str, list[float]] = {"short": [], "captions": []}
        for name, queries in (("short", SHORT_QUERIES), ("captions", sentences)):
            for s in queries:
                body = {"terms": [{"weight": 1.0, "kind": "text", "value": s}], "target": "image", "k": 10}
                t = time.perf_counter()
                status, answer = request(state, "POST", "/search", body)
                times[name].append(time.perf_counter() - t)
                assert status == 200 and len(answer["hits"]) == 10, answer
        client = []
        for s in sentences[:3]:
            wall, _ = run_loupe(["search", s, "-k", "10"], home, LOUPE_NO_SERVER="0")
            client.append(wall)
    finally:
        stop_serve(proc)
    out: dict = {"loupe_search_via_server_wall_seconds": round(median(client), 3)}
    for name, ts in times.items():
        ms = sorted(1000 * t for t in ts[3:])  # the first few warm caches
        out[name] = {
            "queries": len(ms),
            "p50_ms": round(statistics.median(ms), 2),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
            "mean_ms": round(statistics.fmean(ms), 2),
        }
    return out


def text_encoding(encoder, sentences: list[str]) -> dict:
    """In-process time to embed one query (the part of a warm query no index can save)."""
    out = {}
    for name, queries in (("short", SHORT_QUERIES), ("captions", sentences)):
        encoder.encode_texts(queries[:3])
        ms = []
        for q in queries:
            t = time.perf_counter()
            encoder.encode_texts([q])
            ms.append(1000 * (time.perf_counter() - t))
        out[f"{name}_p50_ms"] = round(statistics.median(ms), 2)
    return out


def index_recall(home: Path, images: np.ndarray, ids: np.ndarray, text_q: np.ndarray, image_q: np.ndarray) -> dict:
    from loupe.indexer.storage.catalog import IMAGE
    from loupe.indexer.storage.store import Store

    index = Store.open(home=home).vector_index(IMAGE)
    out = {"factory": index.factory, "nprobe": index.nprobe}
    for name, q in (("text", text_q), ("image", image_q)):
        truth = exact_top(q, images, ids)
        t = time.perf_counter()
        _, found = index.search(q, 10)
        out[f"{name}_recall@10"] = round(recall(found, truth), 4)
        out[f"{name}_ms_per_query_batched"] = round(1000 * (time.perf_counter() - t) / len(q), 3)
    t = time.perf_counter()
    for i in range(50):
        index.search(text_q[i : i + 1], 10)
    out["text_ms_per_single_query"] = round(1000 * (time.perf_counter() - t) / 50, 3)
    return out


def compare_kinds(images: np.ndarray, text_q: np.ndarray, image_q: np.ndarray, hnsw: bool) -> list[dict]:
    """Index kinds on the same vectors, one query at a time: recall@10 for text and image queries."""
    import faiss

    from loupe.indexer.storage import vectors
    from loupe.indexer.storage.vectors import VectorIndex, default_nprobe

    n = len(images)
    ids = np.arange(n, dtype=np.int64)
    truth_t, truth_i = exact_top(text_q, images, ids), exact_top(image_q, images, ids)
    nlist = vectors.auto_nlist(n)
    rows = []
    kinds = ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},SQ8", f"IVF{nlist},PQ64"]
    if hnsw:
        kinds.append("HNSW32,Flat")
    for factory in kinds:
        index = VectorIndex.create(images.shape[1], factory)
        t = time.perf_counter()
        if not index.is_trained:
            index.train(images[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)])
        index.add(ids, images)
        build = time.perf_counter() - t
        index.exact_vectors = lambda sel: images[sel]
        for rerank in ([False, True] if "PQ" in factory else [not index.exact]):
            row = {"factory": factory, "rerank": rerank, "build_seconds": round(build, 1)}
            if "IVF" in factory:
                row["nprobe"] = default_nprobe(nlist)
            for name, q, truth in (("text", text_q, truth_t), ("image", image_q, truth_i)):
                t = time.perf_counter()
                if rerank or index.exact:
                    found = np.concatenate([index.search(q[i : i + 1], 10)[1] for i in range(len(q))])
                else:  # the raw approximate ranking, as FAISS returns it
                    params = index._params(None, 1)
                    found = np.concatenate([index.index.search(q[i : i + 1], 10, params=params)[1] for i in range(len(q))])
                row[f"{name}_recall@10"] = round(recall(found, truth), 4)
                row[f"{name}_ms_per_query"] = round(1000 * (time.perf_counter() - t) / len(q), 3)
            rows.append(row)
            print(f"    {row}")
        del index
    return rows


def blas_threshold(images: np.ndarray, queries: np.ndarray) -> dict:
    import faiss

    flat = faiss.IndexFlatIP(images.shape[1])
    flat.add(images)
    out = {}
    from loupe.indexer.storage.vectors import BLAS_THRESHOLD

    for name, value in (("faiss_default", 128000), ("loupe", BLAS_THRESHOLD)):
        faiss.cvar.distance_compute_blas_threshold = value
        t = time.perf_counter()
        flat.search(np.ascontiguousarray(queries[:100]), 10)
        out[f"{name}_threshold_{value}_seconds"] = round(time.perf_counter() - t, 3)
    out["speedup"] = round(out[f"faiss_default_threshold_128000_seconds"] / out[f"loupe_threshold_{BLAS_THRESHOLD}_seconds"], 1)
    return out


def main() -> None:
    p = size_sweep_parser(__doc__, "10000,100000,1000000")
    p.add_argument("--repeats", type=int, default=5, help="cold runs per size")
    p.add_argument("--queries", type=int, default=200, help="text/image queries for recall")
    p.add_argument("--warm-queries", type=int, default=60)
    p.add_argument("--spread", type=float, default=1.5, help="synthetic content noise (1.2: more clustered)")
    p.add_argument("--skip-kinds", action="store_true", help="skip the index-kind comparison")
    a = p.parse_args()

    ckpt = checkpoint("ViT-B-32")
    encoder = load_checkpoint(ckpt)
    world = ClipLike(spread=a.spread)
    text_q, image_q = world.texts(a.queries), world.images(a.queries, seed=99)
    sentences = captions(a.warm_queries)
    out = {"machine": machine(), "synthetic": {"spread": a.spread}, "sizes": []}
    out["text_encoding_in_process"] = {"fp32": text_encoding(encoder, sentences)}
    precision = encoder.set_text_precision("auto")  # what `loupe search` / `loupe serve` use here
    if precision != "fp32":
        out["text_encoding_in_process"][precision] = text_encoding(encoder, sentences)
    print(f"text encoding alone: {out['text_encoding_in_process']}")
    compared = False
    for n in a.sizes:
        print(f"{n} vectors (load {load_average()})")
        home, images, ids = build_home(n, a.workdir, encoder, world)
        row = {"vectors": n, "synthetic_stats": stats(images, text_q)}
        row["recall"] = index_recall(home, images, ids, text_q, image_q)
        print(f"  recall: {row['recall']}")
        row["cold"] = cold(home, a.repeats, ckpt, sentences[0])
        print(f"  cold: {row['cold']}")
        row["warm"] = warm(home, sentences)
        print(f"  warm: {row['warm']}")
        row["load_average"] = load_average()
        if not a.skip_kinds and not compared and n >= 100_000:
            row["index_kinds"] = compare_kinds(images, text_q, image_q, hnsw=n <= 200_000)
            compared = True
        if n >= 1_000_000:
            row["flat_batch_of_100"] = blas_threshold(images, text_q)
            print(f"  blas: {row['flat_batch_of_100']}")
        out["sizes"].append(row)
        write_json("bench_query.json", out)
    targets = {}
    for row in out["sizes"]:
        n = row["vectors"]
        targets[f"cold_ratio_{n}"] = {"value": row["cold"]["ratio"], "target": 1.3, "met": row["cold"]["ratio"] <= 1.3}
        limit = 20 if n <= 100_000 else 50
        for name in ("short", "captions"):
            p50 = row["warm"][name]["p50_ms"]
            targets[f"warm_p50_ms_{name}_{n}"] = {"value": p50, "target": limit, "met": p50 <= limit}
        if n >= 100_000:
            r = row["recall"]["text_recall@10"]
            targets[f"text_recall@10_{n}"] = {"value": r, "target": 0.98, "met": r >= 0.98}
    out["targets"] = targets
    out["load_average_at_end"] = load_average()
    print(json.dumps(targets, indent=1))
    write_json("bench_query.json", out)


if __name__ == "__main__":
    main()
