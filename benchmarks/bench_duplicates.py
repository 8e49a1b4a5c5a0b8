"""Near-duplicates (issue 20): quality on an edited-copy + burst set with a RANDOM-weight model,
grouping at scale, and the signal's cost against the embedding.

  python benchmarks/bench_duplicates.py quality [--n-edit 60 --n-burst 30 --n-distract 200]
  python benchmarks/bench_duplicates.py scale [--n 100000 --add 1000]
  python benchmarks/bench_duplicates.py cost [--n 64]

quality: builds the set (benchmarks/dupset.py), indexes it with `loupe index` (random-weight
ViT-B-32), runs `loupe duplicates --json`, and prints both tiers' pairwise precision/recall,
recall per edit kind, burst pairs put in "same" (must be 0) and keeper accuracy (file dates shuffled).
scale: synthetic signals (real signals of flickr photos with their hashes re-drawn: 100k distinct
contents, 5% of them edited copies of another) grouped from nothing, then 1,000 more added; time and peak RSS.
cost: the signal's extraction time per photo against the embedding time per photo (same decode).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import FLICKR, PYTHON, REPO, checkpoint, load_checkpoint, machine  # noqa: E402


def quality(a) -> dict:
    from benchmarks import dupset

    d = Path(tempfile.mkdtemp(prefix="loupe-dups-"))
    man = dupset.build(d / "photos", FLICKR, a.n_edit, a.n_burst, a.n_distract, seed=a.seed)
    env = dict(os.environ, LOUPE_HOME=str(d / "home"), HF_HUB_OFFLINE="1", LOUPE_TEXT_TOWER="0", PYTHONPATH=str(REPO))
    t = time.perf_counter()
    subprocess.run([PYTHON, "-m", "loupe", "index", str(d / "photos"), "--checkpoint", str(checkpoint())], env=env, check=True,
                   capture_output=True)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    out = subprocess.run([PYTHON, "-m", "loupe", "duplicates", "--json"], env=env, check=True, capture_output=True, text=True).stdout
    t_group = time.perf_counter() - t
    scores = dupset.pair_scores(man, [json.loads(line) for line in out.splitlines()])
    scores.update(files=len(man), index_s=round(t_index, 1), duplicates_s=round(t_group, 2))
    return scores


def _synthetic(n: int, seed: int = 0):
    """n synthetic signals: real signals of flickr photos with fresh random hashes; 5% are copies of another (a few bits flipped)."""
    import numpy as np
    from PIL import Image

    from loupe.indexer.signals import neardup

    rng = np.random.default_rng(seed)
    files = sorted(FLICKR.iterdir())[:200]
    real = [neardup.extract_signal(Image.open(f).convert("RGB")) for f in files]
    H = neardup.HEADER
    keys, sigs = [], []
    base_t = 1.6e9
    for i in range(n):
        src = real[i % len(real)]
        v = list(H.unpack_from(src, 0))
        if i > 10 and rng.random() < 0.05:  # a copy of an earlier item: its hashes with 0-4 bits flipped
            j = int(rng.integers(0, i))
            vj = H.unpack_from(sigs[j], 0)
            v = list(vj)
            flips = [1 << int(b) for b in rng.integers(0, 64, int(rng.integers(0, 5)))]
            ph, ph88 = vj[5], vj[6]
            for f in flips:
                ph ^= f
            v[5], v[6], v[7] = ph, ph88, vj[7]
            body = sigs[j][H.size:]
        else:
            v[5], v[6] = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)), int(rng.integers(0, 2**63)) * 2 + 1
            v[7] = base_t + i * 37.0 + float(rng.random())
            body = src[H.size:]
        keys.append(f"{i:032x}")
        sigs.append(H.pack(*v) + body)
    return keys, sigs


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale(a) -> dict:
    from loupe.retrieval.engine.duplicates import Grouper

    keys, sigs = _synthetic(a.n + a.add, a.seed)
    store = dict(zip(keys, sigs))
    rss0 = _rss_mib()
    g = Grouper()
    t = time.perf_counter()
    r1 = g.add(keys[: a.n], sigs[: a.n], fetch=lambda ks: {k: store[k] for k in ks})
    clusters = g.clusters()
    t_group = time.perf_counter() - t
    t = time.perf_counter()
    r2 = g.add(keys[a.n :], sigs[a.n :], fetch=lambda ks: {k: store[k] for k in ks})
    g.clusters()
    t_add = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        g.save(Path(tmp) / "s.npz")
        Grouper.load(Path(tmp) / "s.npz")
        t_state = time.perf_counter() - t
    return {"n": a.n, "group_s": round(t_group, 2), "candidates": r1.candidates, "same_edges": r1.same_edges,
            "groups": len(clusters), "add": a.add, "add_s": round(t_add, 2), "add_candidates": r2.candidates,
            "state_save_load_s": round(t_state, 2), "rss_before_mib": round(rss0), "peak_rss_mib": round(_rss_mib()),
            "targets": {"group_s<=": 60, "add_s<=": 5}}


def cost(a) -> dict:
    """Extraction per photo vs embedding per photo, on the same decoded pictures (the pipeline's decode)."""
    import torch
    from PIL import Image, ImageOps

    from loupe.indexer.signals import neardup

    torch.set_num_threads(2)
    enc = load_checkpoint(checkpoint())
    files = sorted(FLICKR.iterdir())[: a.n]
    imgs = []
    for f in files:
        im = Image.open(f)
        im.draft("RGB", (448, 448))
        imgs.append((ImageOps.exif_transpose(im).convert("RGB"), f.read_bytes()))
    pix = torch.stack([enc.preprocess(im) for im, _ in imgs])
    enc.encode_images(pix[:8])
    t = time.perf_counter()
    for s in range(0, len(pix), 32):
        enc.encode_images(pix[s : s + 32])
    emb = (time.perf_counter() - t) / len(pix)
    t = time.perf_counter()
    for im, data in imgs:
        neardup.extract_signal(im, data)
    sig = (time.perf_counter() - t) / len(imgs)
    return {"photos": len(imgs), "embed_ms_per_photo": round(emb * 1e3, 2), "signal_ms_per_photo": round(sig * 1e3, 2),
            "ratio": round(sig / emb, 3), "target_ratio<=": 0.10, "model": "ViT-B-32 (random weights)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["quality", "scale", "cost", "all"])
    ap.add_argument("--n-edit", type=int, default=60)
    ap.add_argument("--n-burst", type=int, default=30)
    ap.add_argument("--n-distract", type=int, default=200)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--add", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps({"machine": machine(), "load": os.getloadavg()}))
    for what in (["quality", "scale", "cost"] if a.what == "all" else [a.what]):
        if a.n is None or a.what == "all":
            a.n = {"scale": 100_000, "cost": 64}.get(what, a.n)
        print(json.dumps({what: globals()[what](a)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
