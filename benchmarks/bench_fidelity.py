"""Faithful pixels: how far loupe's photo decoding moves image vectors from the reference, and what it saves.

    .venv/bin/python benchmarks/bench_fidelity.py                          # 200 flickr8k_800 photos + 20 of 12 MP
    .venv/bin/python benchmarks/bench_fidelity.py --limit 40 --large 4     # quick

The reference pixels are CLIP_benchmark's: PIL open -> `.convert("RGB")` -> open_clip's own
preprocess (what published recall tables use, and what `loupe eval` and `loupe train` now use).
For every photo, interleaved, it times (one thread, decode + preprocess to the model's tensor)
and embeds:
  reference     PIL open -> convert("RGB") -> preprocess,
  loupe before  loupe's photo decoding as it was: JPEG draft mode straight to the model's input side,
  loupe now     loupe's photo decoding (`loupe index`, queries by image): draft mode only down to
                DRAFT_FACTOR (2) times the input side,
and a few other draft factors for the trade-off. Two photo sizes: ../shared/data/flickr8k_800
(mostly 200 or 500 px on the long side) and 4000x3000 JPEGs (quality 90) upscaled from them into
--workdir. Two models: open_clip ViT-B-32 with random weights (224 px input) and loupe-tiny
(64 px input) trained by `loupe train` on flickr8k_800 (small models are the sensitive case).
Cosines are between each pipeline's image vector and the reference vector of the same photo.
Writes benchmarks/out/bench_fidelity.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import CAPTIONS, FLICKR, OUT, checkpoint, load_average, machine, median, run_loupe, write_json

FACTORS = (1.0, 2.0, 4.0)  # draft factors measured; 1 = loupe before, 2 = loupe now (DRAFT_FACTOR)


def make_large(src: Path, dst: Path, n: int, size: tuple[int, int] = (4000, 3000)) -> list[Path]:
    """`n` 12 MP JPEGs (quality 90) upscaled from real photos: camera-sized files with real content."""
    from PIL import Image

    marker = dst / ".complete"
    if not (marker.exists() and marker.read_text() == f"{n} {size} q90"):
        dst.mkdir(parents=True, exist_ok=True)
        for old in dst.glob("*.jpg"):
            old.unlink()
        for i, path in enumerate(sorted(src.iterdir())[:n]):
            with Image.open(path) as img:
                img.convert("RGB").resize(size, Image.BICUBIC).save(dst / f"large_{i:04d}.jpg", quality=90)
        marker.write_text(f"{n} {size} q90")
    return sorted(dst.glob("*.jpg"))


def trained_tiny(steps: int) -> Path:
    """loupe-tiny trained by `loupe train` on flickr8k_800 (made once under benchmarks/out/models)."""
    path = OUT / "models" / f"loupe-tiny-flickr8k-{steps}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"training {path.name} ({steps} steps) ...", flush=True)
        run_loupe(["train", "--model", "loupe-tiny", "--images", FLICKR, "--annotations", CAPTIONS,
                   "--steps", str(steps), "--device", "cpu", "--out", path], OUT / "home-train")
    return path


def pipelines(encoder) -> dict:
    """name -> function(path) giving the model's input tensor."""
    from PIL import Image

    from indexer.imageio import decode_image

    size, pre = encoder.image_size, encoder.preprocess

    def reference(path: Path):
        with Image.open(path) as img:
            return pre(img.convert("RGB"))

    out = {"reference": reference}
    for f in FACTORS:
        label = {1.0: "loupe before (draft 1x)", 2.0: "loupe now (draft 2x)"}.get(f, f"draft {f:g}x")
        out[label] = lambda path, f=f: decode_image(path, size, pre, draft_factor=f)[0]
    out["loupe eval/train (reference mode)"] = lambda path: decode_image(path, size, pre, reference=True)[0]
    return out


def measure(encoder, paths: list[Path], batch: int = 32) -> dict:
    """Per pipeline: decode+preprocess ms per image, cosine to the reference (min, median)."""
    import torch

    funcs = pipelines(encoder)
    seconds = {name: 0.0 for name in funcs}
    tensors: dict[str, list] = {name: [] for name in funcs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one decode = one thread, as in loupe's decode workers
    try:
        for path in paths:
            for name, fn in funcs.items():  # interleaved: the machine's load drifts alike for all
                t = time.perf_counter()
                tensors[name].append(fn(path))
                seconds[name] += time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    vectors = {
        name: np.concatenate([encoder.encode_images(torch.stack(ts[i : i + batch])) for i in range(0, len(ts), batch)])
        for name, ts in tensors.items()
    }
    ref = vectors["reference"]
    rows = {}
    for name in funcs:
        cos = np.sum(vectors[name] * ref, axis=1)
        px = max(float((tensors[name][i] - tensors["reference"][i]).abs().max()) for i in range(len(paths)))
        rows[name] = {
            "ms_per_image": round(1000 * seconds[name] / len(paths), 2),
            "speedup_vs_reference": round(seconds["reference"] / seconds[name], 2),
            "cos_min": round(float(cos.min()), 5),
            "cos_median": round(float(np.median(cos)), 5),
            "max_abs_pixel_diff": round(px, 4),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="flickr8k_800 photos to use")
    ap.add_argument("--large", type=int, default=20, help="12 MP photos to make and use")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loupe-bench"))
    args = ap.parse_args()

    from indexer.encoder import load_encoder, make_spec

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_average_at_start']}")
    small = sorted(p for p in FLICKR.iterdir() if p.suffix == ".jpg")[: args.limit]
    large = make_large(FLICKR, args.workdir / "large-q90", args.large)
    models = {"ViT-B-32 (random weights, 224 px)": checkpoint("ViT-B-32"),
              f"loupe-tiny (trained {args.steps} steps on flickr8k_800, 64 px)": trained_tiny(args.steps)}
    results: dict = {"machine": info, "photos": {"flickr8k_800": len(small), "12 MP (4000x3000, q90)": len(large)}, "runs": []}
    for model_name, ckpt in models.items():
        encoder = load_encoder(make_spec(None, None, ckpt), "cpu")
        for set_name, paths in (("flickr8k_800", small), ("12 MP (4000x3000, q90)", large)):
            rows = measure(encoder, paths)
            results["runs"].append({"model": model_name, "photos": set_name, "n": len(paths), "pipelines": rows})
            print(f"\n{model_name}, {len(paths)} photos {set_name}")
            print(f"  {'pipeline':<36}{'ms/img':>9}{'speed-up':>10}{'cos min':>10}{'cos median':>12}")
            for name, r in rows.items():
                print(f"  {name:<36}{r['ms_per_image']:>9.2f}{r['speedup_vs_reference']:>9.2f}x"
                      f"{r['cos_min']:>10.5f}{r['cos_median']:>12.5f}")
    results["load_average_at_end"] = load_average()
    write_json("bench_fidelity.json", results)


if __name__ == "__main__":
    main()
