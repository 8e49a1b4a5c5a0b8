"""Indexing speed: `loupe index` against the encoder's ceiling and a plain user loop, side by side.

    .venv/bin/python benchmarks/bench_index.py                          # flickr8k_800 + 120 large photos
    .venv/bin/python benchmarks/bench_index.py --limit 200 --large 30 --repeats 1   # quick

On the same folder and model (ViT-B-32, random weights: the speed of the pretrained model),
each repeat measures, interleaved:
  (a) bare:  the encoder alone on ready preprocessed tensors (the ceiling),
  (b) plain: the loop a user would write: PIL open -> open_clip preprocess -> batch -> model,
  (c) loupe: `loupe index FOLDER` from the shell into a fresh index; its rate is images
      embedded per second of the indexing run (walk, read, hash, decode, embed, commit, FAISS
      save), i.e. without process start and model load, which are reported separately.
Folders: ../shared/data/flickr8k_800/images, and 4000x3000 JPEGs made from those photos
(in --workdir), where decoding dominates. Writes benchmarks/out/bench_index.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import FLICKR, checkpoint, load_average, load_checkpoint, machine, median, run_loupe, write_json


def make_large(src: Path, dst: Path, n: int, size: tuple[int, int] = (4000, 3000)) -> list[Path]:
    """`n` large JPEGs (quality 92) upscaled from real photos: camera-sized files with real content."""
    from PIL import Image

    marker = dst / ".complete"
    if not (marker.exists() and marker.read_text() == f"{n} {size}"):
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for i, path in enumerate(sorted(src.iterdir())[:n]):
            with Image.open(path) as img:
                img.convert("RGB").resize(size, Image.BICUBIC).save(dst / f"large_{i:04d}.jpg", quality=92)
        marker.write_text(f"{n} {size}")
    return sorted(p for p in dst.iterdir() if p.suffix == ".jpg")


def bare_rate(encoder, n: int, batch: int) -> float:
    import torch

    x = torch.randn(batch, 3, encoder.image_size, encoder.image_size)
    encoder.encode_images(x)  # first call warms up
    t = time.perf_counter()
    done = 0
    while done < n:
        encoder.encode_images(x)
        done += batch
    return done / (time.perf_counter() - t)


def plain_rate(encoder, paths: list[Path], batch: int) -> float:
    """What most scripts do: open, convert, open_clip's preprocess, stack, encode. One process."""
    import torch
    from PIL import Image

    t = time.perf_counter()
    for start in range(0, len(paths), batch):
        tensors = [encoder.preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + batch]]
        encoder.encode_images(torch.stack(tensors))
    return len(paths) / (time.perf_counter() - t)


def loupe_rate(folder: Path, home: Path, batch: int, ckpt: Path) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    wall, proc = run_loupe(["index", folder, "--checkpoint", ckpt, "-b", str(batch), "--json"], home)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    embed_seconds = report["seconds"] - report.get("deferred_seconds", 0.0)  # OCR's own pass runs after the embeddings
    return {
        "rate": report["embedded"] / embed_seconds,
        "deferred_seconds": report.get("deferred_seconds", 0.0),
        "embedded": report["embedded"],
        "index_seconds": report["seconds"],
        "encode_seconds": report["encode_seconds"],
        "command_wall_seconds": wall,
    }


def bench(name: str, folder: Path, paths: list[Path], encoder, ckpt: Path, a) -> dict:
    rows = []
    for r in range(a.repeats):
        load = load_average()
        bare = bare_rate(encoder, len(paths), a.batch)
        plain = plain_rate(encoder, paths, a.batch)
        lp = loupe_rate(folder, a.workdir / f"index-{name}-home", a.batch, ckpt)
        row = {"bare": round(bare, 2), "plain": round(plain, 2), "loupe": round(lp["rate"], 2), "load_average": load, "loupe_detail": lp}
        rows.append(row)
        print(f"  {name} #{r + 1}: bare {bare:.1f} img/s, plain loop {plain:.1f}, loupe index {lp['rate']:.1f} "
              f"(command {lp['command_wall_seconds']:.1f} s for {lp['embedded']}), load {load}")
    bare, plain, lp = (median([row[k] for row in rows]) for k in ("bare", "plain", "loupe"))
    return {
        "folder": str(folder), "images": len(paths), "repeats": rows,
        "bare_median": round(bare, 2), "plain_median": round(plain, 2), "loupe_median": round(lp, 2),
        "loupe_vs_bare": round(median([row["loupe"] / row["bare"] for row in rows]), 3),
        "loupe_vs_plain": round(median([row["loupe"] / row["plain"] for row in rows]), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="use only the first N flickr photos (0: all 800)")
    p.add_argument("--large", type=int, default=120, help="large photos to make (0: skip)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loupe-bench"))
    a = p.parse_args()

    ckpt = checkpoint(a.model)
    encoder = load_checkpoint(ckpt, a.device)
    out = {"machine": machine(), "model": a.model, "device": str(encoder.device), "batch": a.batch, "runs": {}}
    folder = FLICKR
    paths = sorted(folder.iterdir())
    if a.limit:
        folder = a.workdir / f"flickr-{a.limit}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for src in paths[: a.limit]:
                shutil.copy2(src, folder / src.name)
        paths = sorted(folder.iterdir())
    out["runs"]["flickr8k_800"] = bench("flickr", folder, paths, encoder, ckpt, a)
    if a.large:
        large = make_large(FLICKR, a.workdir / f"large-{a.large}", a.large)
        out["runs"]["large_4000x3000"] = bench("large", large[0].parent, large, encoder, ckpt, a)
    f, l = out["runs"]["flickr8k_800"], out["runs"].get("large_4000x3000")
    out["targets"] = {"loupe_vs_bare_flickr": {"value": f["loupe_vs_bare"], "target": 0.9, "met": f["loupe_vs_bare"] >= 0.9}}
    if l:
        out["targets"]["loupe_vs_plain_large"] = {"value": l["loupe_vs_plain"], "target": 2.0, "met": l["loupe_vs_plain"] >= 2.0}
    out["load_average_at_end"] = load_average()
    print(json.dumps(out["targets"], indent=1))
    write_json("bench_index.json", out)


if __name__ == "__main__":
    main()
