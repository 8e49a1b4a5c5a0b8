"""Image encoding precision on CPU: speed and fidelity of fp32, bf16, int8 (and what else was tried).

    .venv/bin/python benchmarks/bench_precision.py                       # everything, real photos
    .venv/bin/python benchmarks/bench_precision.py --photos 64 --rounds 2 --skip-index --skip-rclip   # quick

On ViT-B-32 (random weights: the speed of the pretrained model) and the 800 flickr8k photos:
  (a) bare encoder, batch 32, on ready preprocessed real photos: img/s per precision, measured
      in interleaved rounds (the machine is shared: the best round is the least disturbed), and
      the min/median cosine of each photo's vector to its fp32 vector. `--extras compile,ort`
      also tries torch.compile and ONNX Runtime fp32/int8 on the same photos;
  (b) `loupe index` of the 800 photos into a fresh index, per precision, as a user runs it;
      its rate is images embedded per second of the indexing run (as benchmarks/bench_index.py);
  (c) `loupe eval` recall of a small model trained by `loupe train` (loupe-tiny), fp32 against
      the fastest precision here and bf16 (with `--trained FILE`, or trained here with --train-steps;
      bench_precision_recall.py is the full recall study);
  (d) rclip 3.3.0 (its own venv under --cache, a random-weight ViT-B-32-256 exported to its
      ONNX layout) indexing the same photos, whole process wall time.
bf16 is timed only on CPUs with bf16 units (elsewhere it is emulated, ~10x slower than fp32,
and `fastest` never picks it); `--precisions fp32,fastest` indexes with `--precision <the fastest here>`
(`auto` is fp32 on CPUs: bench_precision_recall.py); its fidelity is measured everywhere. Writes benchmarks/out/bench_precision.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import CAPTIONS, FLICKR, checkpoint, load_average, load_checkpoint, machine, median, run_loupe, write_json

RCLIP_VERSION = "3.3.0"
RCLIP_MODEL = "ViT-B-32-256-datacomp_s34b_b86k"


def photos_tensor(encoder, n: int):
    import torch
    from PIL import Image

    paths = sorted(FLICKR.iterdir())[:n]
    return torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])


def variants(encoder, extras: list[str], workdir: Path, timed_bf16: bool) -> dict:
    """name -> (function from an fp32 batch to vectors, whether to time it)."""
    import torch

    from loupe.indexer.models import precision

    visual = encoder.model.visual

    def run(module, dtype=torch.float32):
        def f(x):
            with torch.inference_mode():
                return torch.nn.functional.normalize(module(x.to(dtype)).float(), dim=-1).numpy()
        return f

    out = {"fp32": (run(visual), True)}
    out["bf16"] = (run(precision.lowered(visual, "bf16"), torch.bfloat16), timed_bf16)
    out["int8"] = (run(precision.lowered(visual, "int8")), True)
    if "compile" in extras:
        compiled = torch.compile(copy.deepcopy(visual))
        t = time.perf_counter()
        with torch.inference_mode():
            compiled(torch.zeros(32, 3, encoder.image_size, encoder.image_size))
        print(f"  torch.compile: first call {time.perf_counter() - t:.1f} s", flush=True)
        out["fp32_compile"] = (run(compiled), True)
    if "ort" in extras:
        for name, sess in onnx_sessions(visual, encoder.image_size, workdir).items():
            def f(x, sess=sess):
                y = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
                return torch.nn.functional.normalize(y, dim=-1).numpy()
            out[name] = (f, True)
    return out


def onnx_sessions(visual, size: int, workdir: Path) -> dict:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = workdir / "visual.onnx", workdir / "visual.int8.onnx"
    if not fp32.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(
            visual, (torch.zeros(2, 3, size, size),), str(fp32), input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=18, dynamo=False,
        )
    if not int8.exists():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    return {
        "ort_fp32": ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"]),
        "ort_int8": ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"]),
    }


def bare(encoder, a) -> dict:
    """Interleaved rounds over the variants; img/s per round, and fidelity to fp32 on every photo."""
    from loupe.indexer.models.precision import cpu_has_bf16

    x = photos_tensor(encoder, a.photos)
    todo = variants(encoder, a.extras, a.workdir / "onnx", cpu_has_bf16())
    rates: dict[str, list[float]] = {name: [] for name, (_, timed) in todo.items() if timed}
    vectors: dict[str, np.ndarray] = {}
    for name, (f, _) in todo.items():  # warm-up, and the vectors compared to fp32
        n = len(x) if todo[name][1] else min(len(x), 8)
        vectors[name] = np.concatenate([f(x[s : s + a.batch]) for s in range(0, n, a.batch)])
    for r in range(a.rounds):
        for name in rates:
            f = todo[name][0]
            t = time.perf_counter()
            for s in range(0, len(x), a.batch):
                f(x[s : s + a.batch])
            rates[name].append(len(x) / (time.perf_counter() - t))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + f" img/s (load {load_average()})", flush=True)
    out = {}
    ref = vectors["fp32"]
    for name in todo:
        cos = np.sum(vectors[name] * ref[: len(vectors[name])], axis=1)
        row = {"photos_compared": len(cos), "min_cosine": round(float(cos.min()), 6), "median_cosine": round(float(np.median(cos)), 6)}
        if name in rates:
            row |= {"rate_median": round(median(rates[name]), 2), "rate_best": round(max(rates[name]), 2), "rates": [round(v, 2) for v in rates[name]]}
        else:
            row["timed"] = "no: this CPU has no bf16 units (emulated, far slower than fp32)"
        out[name] = row
    for name, row in out.items():
        if "rate_best" in row:
            row["speedup_best_vs_fp32"] = round(row["rate_best"] / out["fp32"]["rate_best"], 3)
            row["speedup_median_vs_fp32"] = round(row["rate_median"] / out["fp32"]["rate_median"], 3)
    return out


def loupe_index(ckpt: Path, precision: str, a) -> dict:
    home = a.workdir / f"index-{precision}"
    shutil.rmtree(home, ignore_errors=True)
    wall, proc = run_loupe(["index", FLICKR, "--checkpoint", ckpt, "-b", str(a.batch), "--precision", precision, "--json"], home)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    _, info = run_loupe(["info", "--json"], home)
    return {
        "rate": round(report["embedded"] / report["seconds"], 2), "embedded": report["embedded"],
        "precision_used": report["precision"], "index_seconds": round(report["seconds"], 2),
        "encode_seconds": round(report["encode_seconds"], 2), "command_wall_seconds": round(wall, 2),
        "precision_check_seconds": round(report["precision_check_seconds"], 3),
        "recorded": json.loads(info.stdout)["image_precision"], "notice": proc.stderr.strip()[-300:] or None,
    }


def recall(trained: Path, precision: str) -> dict:
    out = Path(f"/tmp/loupe-bench-eval-{precision}.json")
    _, proc = run_loupe(
        ["eval", "--images", FLICKR, "--annotations", CAPTIONS, "--checkpoint", trained, "--precision", precision, "--json", out],
        Path("/tmp/loupe-bench-eval-home"),
    )
    data = json.loads(out.read_text())
    return {"precision": data["model"]["image_precision"], "cosine": data["model"]["image_cosine"], "exact": data["scores"]["exact"]}


def rclip_rate(a) -> dict:
    """rclip indexing the 800 photos, whole process (its model load included), in its own venv."""
    root = a.cache / "rclip"
    venv = root / "venv"
    rclip = venv / "bin" / "rclip"
    if not rclip.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"rclip=={RCLIP_VERSION}"], check=True)
    data = root / "data"
    model_dir = data / RCLIP_MODEL
    if not (model_dir / "textual.onnx").exists():
        export_rclip_model(model_dir, data / "tokenizer")
    photos = a.workdir / "rclip-photos"  # rclip indexes the folder it runs in: a private copy keeps ./shared clean
    if not photos.exists():
        shutil.copytree(FLICKR, photos)
    runs = []
    for r in range(a.rclip_repeats):
        shutil.rmtree(a.workdir / "rclip-db", ignore_errors=True)
        env = dict(os.environ, RCLIP_DATADIR=str(a.workdir / "rclip-db"), HF_HUB_OFFLINE="1")
        # rclip keeps its database beside its model: link the model into a fresh data dir each time
        (a.workdir / "rclip-db").mkdir(parents=True)
        for item in data.iterdir():
            (a.workdir / "rclip-db" / item.name).symlink_to(item)
        t = time.perf_counter()
        proc = subprocess.run([str(rclip), "-f", "-t", "3", "a dog running on the grass"], cwd=photos, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"rclip failed: {proc.stderr[-500:]}")
        n = len(list(photos.iterdir()))
        runs.append({"wall_seconds": round(wall, 2), "rate": round(n / wall, 2), "load_average": load_average()})
        print(f"  rclip #{r + 1}: {n} photos in {wall:.1f} s wall = {n / wall:.1f} img/s", flush=True)
    return {"version": RCLIP_VERSION, "model": RCLIP_MODEL + " (random weights)", "runs": runs,
            "rate_median": round(median([x["rate"] for x in runs]), 2), "rate_best": max(x["rate"] for x in runs)}


def export_rclip_model(model_dir: Path, tokenizer_dir: Path) -> None:
    """A random-weight ViT-B-32-256 in the ONNX layout rclip loads (input 'input', one output)."""
    import open_clip
    import torch

    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-256", pretrained=None).eval()

    class Textual(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):
            return self.m.encode_text(tokens)

    kw = dict(input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
              opset_version=18, dynamo=False)
    torch.onnx.export(model.visual, (torch.zeros(1, 3, 256, 256),), str(model_dir / "visual.onnx"), **kw)
    torch.onnx.export(Textual(model), (torch.zeros(1, 77, dtype=torch.long),), str(model_dir / "textual.onnx"), **kw)
    shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", tokenizer_dir / "bpe_simple_vocab_16e6.txt.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--photos", type=int, default=128, help="real photos for the bare-encoder rates and cosines")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--extras", default="", help="comma list: compile, ort")
    p.add_argument("--precisions", default="fp32,fastest", help="`loupe index` runs, e.g. fp32,fastest,auto,int8")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--trained", type=Path, help="a loupe-tiny checkpoint from `loupe train` for the recall comparison")
    p.add_argument("--train-steps", type=int, default=0, help="train one here if --trained is not given (0: skip recall)")
    p.add_argument("--skip-rclip", action="store_true")
    p.add_argument("--rclip-repeats", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loupe-bench-precision"))
    p.add_argument("--out", default="bench_precision.json", help="file name under benchmarks/out")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loupe-bench")
    a = p.parse_args()
    a.extras = [e for e in a.extras.split(",") if e]
    a.workdir.mkdir(parents=True, exist_ok=True)

    from loupe.indexer.models.precision import cpu_has_bf16, fastest, resolve

    ckpt = checkpoint(a.model)
    encoder = load_checkpoint(ckpt)
    auto = resolve("auto", encoder.device, encoder.model.visual)
    fast = fastest(encoder.device, encoder.model.visual)
    out = {"machine": machine(), "model": a.model, "batch": a.batch, "cpu_has_bf16": cpu_has_bf16(), "auto_picks": auto, "fastest": fast}
    print(f"{out['machine']['cpu']}: bf16 units {out['cpu_has_bf16']}, auto picks {auto}, fastest {fast} for {a.model}", flush=True)
    out["bare"] = bare(encoder, a)
    write_json(a.out, out)  # after each stage: a long run cut short keeps what it measured
    del encoder
    if not a.skip_index:
        out["loupe_index"] = {}
        for prec in a.precisions.split(","):
            row = loupe_index(ckpt, fast if prec == "fastest" else prec, a)
            out["loupe_index"][prec] = row
            print(f"  loupe index --precision {prec}: {row['rate']} img/s ({row['precision_used']}), "
                  f"command {row['command_wall_seconds']} s, load {load_average()}", flush=True)
        write_json(a.out, out)
    if not a.skip_rclip:
        try:
            out["rclip"] = rclip_rate(a)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            out["rclip"] = {"error": str(exc)[-500:]}
            print(f"  rclip failed: {exc}", flush=True)
        write_json(a.out, out)
    trained = a.trained
    if trained is None and a.train_steps:
        trained = a.workdir / "loupe-tiny-trained.pt"
        if not trained.exists():
            run_loupe(["train", "--model", "loupe-tiny", "--images", FLICKR, "--annotations", CAPTIONS,
                       "--steps", str(a.train_steps), "--out", trained], a.workdir / "train-home")
    if trained is not None:
        tiny = load_checkpoint(trained)
        tiny_auto = fastest(tiny.device, tiny.model.visual)
        out["recall"] = {"checkpoint": str(trained), "fastest": tiny_auto, "fp32": recall(trained, "fp32")}
        for prec in sorted({tiny_auto, "bf16"} - {"fp32"}):
            out["recall"][prec] = recall(trained, prec)
        print("  recall: " + json.dumps({k: v["exact"] for k, v in out["recall"].items() if isinstance(v, dict)}), flush=True)
    targets = {}
    fp32_bare = out["bare"]["fp32"]["rate_best"]
    best = out.get("loupe_index", {}).get("fastest")
    if best:
        targets["loupe_index_fastest_vs_fp32_bare"] = {"value": round(best["rate"] / fp32_bare, 3), "target": 1.5}
        if "rate_median" in out.get("rclip", {}):
            targets["loupe_index_fastest_vs_rclip_wall"] = {"value": round(best["rate"] / out["rclip"]["rate_median"], 3), "target": 2.0}
    for t in targets.values():
        t["met"] = t["value"] >= t["target"]
    out["targets"] = targets
    out["load_average_at_end"] = load_average()
    print(json.dumps({"bare": {k: {kk: v.get(kk) for kk in ("rate_best", "rate_median", "min_cosine", "median_cosine")}
                               for k, v in out["bare"].items()}, "targets": targets}, indent=1))
    write_json(a.out, out)


if __name__ == "__main__":
    main()
