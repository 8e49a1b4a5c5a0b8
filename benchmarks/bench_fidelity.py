"""Faithful pixels: how far loupe's photo decoding moves image vectors from the reference, and what it saves.

    .venv/bin/python benchmarks/bench_fidelity.py                                 # 200 + 20 + 10 photos
    .venv/bin/python benchmarks/bench_fidelity.py --limit 40 --large 4 --sweep 4  # quick

The reference pixels are CLIP_benchmark's: PIL open -> `.convert("RGB")` -> open_clip's own
preprocess (what published recall tables use, and what `loupe eval` and `loupe train` now use).
For every photo, interleaved, it times (one thread, decode + preprocess to the model's tensor)
and embeds:
  reference     PIL open -> convert("RGB") -> preprocess,
  loupe before  loupe's photo decoding as it was: JPEG draft mode straight to the model's input side,
  loupe now     loupe's photo decoding (`loupe index`, queries by image): draft mode only down to
                DRAFT_FACTOR (5) times the input side,
  draft 2x      the same at twice the input side (the bound first proposed, for the trade-off),
  loupe eval    `decode_image(reference=True)`, what `loupe eval` and `loupe train` read. Two photo sizes: ../shared/data/flickr8k_800
(mostly 200 or 500 px on the long side), 4000x3000 JPEGs (quality 90) upscaled from them, and
4000x3000 collages of 64 of them (12 MP with real detail at every pixel), made in --workdir. Two models: open_clip ViT-B-32 with random weights (224 px input) and loupe-tiny
(64 px input) trained by `loupe train` on flickr8k_800 (small models are the sensitive case).
Cosines are between each pipeline's image vector and the reference vector of the same photo.
Then a headroom sweep with the small model, which chose DRAFT_FACTOR: JPEGs with full-resolution
detail (collages of real 500x375 photos, quality 90) cut to a size where libjpeg decodes at 1/2,
1/4 or 1/8 scale to exactly R times the model's input side, for R = 3, 4, 5, 6: worst and median
cosine to the reference. Writes benchmarks/out/bench_fidelity.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import CAPTIONS, FLICKR, OUT, checkpoint, load_average, load_checkpoint, machine, median, run_loupe, write_json

from loupe.indexer.pipeline.imageio import DRAFT_FACTOR  # noqa: E402  (common puts the repository on sys.path)

FACTORS = (1.0, 2.0, DRAFT_FACTOR)  # 1 = loupe before; DRAFT_FACTOR = loupe now
SWEEP_SCALES = (2, 4, 8)
SWEEP_HEADROOM = (3.0, 4.0, 5.0, 6.0)


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


def make_collages(src: Path, dst: Path, n: int) -> list[Path]:
    """`n` 4000x3000 JPEGs (quality 90) tiled from 64 real 500x375 photos each: 12 MP with detail
    down to the pixel, unlike an upscaled photo (the harder case for draft decoding)."""
    from PIL import Image

    marker = dst / ".complete"
    if not (marker.exists() and marker.read_text() == f"{n} collage q90"):
        dst.mkdir(parents=True, exist_ok=True)
        for old in dst.glob("*.jpg"):
            old.unlink()
        tiles = [p for p in sorted(src.iterdir()) if Image.open(p).size == (500, 375)]
        for i in range(n):
            canvas = Image.new("RGB", (4000, 3000))
            for t in range(64):
                with Image.open(tiles[(i * 64 + t) % len(tiles)]) as tile:
                    canvas.paste(tile.convert("RGB"), ((t % 8) * 500, (t // 8) * 375))
            canvas.save(dst / f"collage_{i:04d}.jpg", quality=90)
        marker.write_text(f"{n} collage q90")
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

    from loupe.indexer.pipeline.imageio import decode_image

    size, pre = encoder.image_size, encoder.preprocess

    def reference(path: Path):
        with Image.open(path) as img:
            return pre(img.convert("RGB"))

    out = {"reference": reference}
    for f in FACTORS:
        label = {1.0: "loupe before (draft 1x)", DRAFT_FACTOR: f"loupe now (draft {f:g}x)"}.get(f, f"draft {f:g}x")
        out[label] = lambda path, f=f: decode_image(path, size, pre, draft_factor=f)[0]
    out["loupe eval/train (reference)"] = lambda path: decode_image(path, size, pre, reference=True)[0]
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
            path.read_bytes()  # in the page cache for every pipeline alike
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


def headroom_sweep(encoder, n: int, seed: int = 0) -> list[dict]:
    """Worst/median cosine to the reference when libjpeg decodes at 1/scale to R x the input side."""
    import io

    import torch
    from PIL import Image

    tiles = [Image.open(p).convert("RGB") for p in sorted(FLICKR.iterdir()) if Image.open(p).size == (500, 375)]
    rng = np.random.default_rng(seed)
    rows = []
    for scale in SWEEP_SCALES:
        for headroom in SWEEP_HEADROOM:
            short = int(scale * headroom * encoder.image_size)
            width = short * 4 // 3
            cols, lines = -(-width // 500), -(-short // 375)
            datas = []
            for _ in range(n):
                canvas = Image.new("RGB", (cols * 500, lines * 375))
                for i, t in enumerate(rng.choice(len(tiles), cols * lines)):
                    canvas.paste(tiles[t], ((i % cols) * 500, (i // cols) * 375))
                buf = io.BytesIO()
                canvas.crop((0, 0, width, short)).save(buf, "JPEG", quality=90)
                datas.append(buf.getvalue())

            def drafted(data: bytes):
                img = Image.open(io.BytesIO(data))
                img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
                assert min(img.size) == short // scale
                return encoder.preprocess(img.convert("RGB"))

            ref = encoder.encode_images(torch.stack([encoder.preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]))
            ours = encoder.encode_images(torch.stack([drafted(d) for d in datas]))
            cos = np.sum(ours * ref, axis=1)
            rows.append({"scale": f"1/{scale}", "headroom": headroom, "photo": f"{width}x{short}", "n": n,
                         "cos_min": round(float(cos.min()), 5), "cos_median": round(float(np.median(cos)), 5)})
            print(f"  1/{scale} scale, decoded side {headroom:g}x the input ({width}x{short}): "
                  f"cos min {cos.min():.5f}, median {np.median(cos):.5f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="flickr8k_800 photos to use")
    ap.add_argument("--large", type=int, default=20, help="12 MP photos to make and use")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    ap.add_argument("--sweep", type=int, default=20, help="photos per cell of the headroom sweep (0: skip)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loupe-bench"))
    args = ap.parse_args()

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_average_at_start']}")
    small = sorted(p for p in FLICKR.iterdir() if p.suffix == ".jpg")[: args.limit]
    large = make_large(FLICKR, args.workdir / "large-q90", args.large)
    collages = make_collages(FLICKR, args.workdir / "collage-q90", max(1, args.large // 2))
    models = {"ViT-B-32 (random weights, 224 px)": checkpoint("ViT-B-32"),
              f"loupe-tiny (trained {args.steps} steps on flickr8k_800, 64 px)": trained_tiny(args.steps)}
    results: dict = {"machine": info, "draft_factor": DRAFT_FACTOR, "runs": []}
    for model_name, ckpt in models.items():
        encoder = load_checkpoint(ckpt)
        for set_name, paths in (("flickr8k_800", small), ("12 MP upscaled (4000x3000, q90)", large),
                                ("12 MP collages (4000x3000, q90)", collages)):
            rows = measure(encoder, paths)
            results["runs"].append({"model": model_name, "photos": set_name, "n": len(paths), "pipelines": rows})
            print(f"\n{model_name}, {len(paths)} photos {set_name}")
            print(f"  {'pipeline':<36}{'ms/img':>9}{'speed-up':>10}{'cos min':>10}{'cos median':>12}")
            for name, r in rows.items():
                print(f"  {name:<36}{r['ms_per_image']:>9.2f}{r['speedup_vs_reference']:>9.2f}x"
                      f"{r['cos_min']:>10.5f}{r['cos_median']:>12.5f}")
    if args.sweep:
        print(f"\nheadroom sweep, {model_name}, {args.sweep} photos per cell")
        results["sweep"] = {"model": model_name, "rows": headroom_sweep(encoder, args.sweep)}
    results["load_average_at_end"] = load_average()
    write_json("bench_fidelity.json", results)


if __name__ == "__main__":
    main()
