"""Does a faster image precision keep `loupe eval` recall within 0.3 points of fp32? On trained models.

    .venv/bin/python benchmarks/bench_precision_recall.py                       # train (cached) + evaluate
    .venv/bin/python benchmarks/bench_precision_recall.py --models loupe-tiny --steps 100 --skip-cli   # quick
    .venv/bin/python benchmarks/bench_precision_recall.py --trained loupe-tiny=/tmp/f8k.pt              # reuse a checkpoint

A random-weight model ranks at chance, so recall is measured on models `loupe train` trains here
(default: loupe-tiny, a ModifiedResNet, and loupe-tiny-vit, a ViT: the tower kind int8 serves;
300 steps on flickr8k_800, cached under --workdir), scored on the same 800 photos / 4000 captions.
Per model and precision (fp32, bf16, int8):
  (a) `loupe eval --precision P --json` as a user runs it: R@1/5/10 both ways, the precision that
      really ran (int8 falls back to fp32 on towers it cannot quantise) and its first-batch cosine;
  (b) the same figures from the same code in this process (pixels decoded once, captions in fp32
      once), with what moved: queries whose rank changed, queries that entered or left the top k,
      their fp32 score margin (a near-tie has a margin below the precision's own score change), and
      a null model: the fp32 image vectors turned by the same angle per photo in random directions,
      many times; a precision whose recall change lies inside that spread behaves like unbiased
      rounding of that size, one outside it moves recall for a reason of its own;
  (c) the verdict against the bound: |delta| <= 0.3 points on all six figures;
  (d) the same null at fixed cosines (every photo turned by one angle): how close to fp32 vectors
      must stay for this model's recall to stay within the bound.
bf16 runs everywhere (emulated without bf16 units: slow, same arithmetic). Writes
benchmarks/out/bench_precision_recall.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from common import CAPTIONS, FLICKR, load_average, load_checkpoint, machine, run_loupe, write_json

BOUND = 0.3  # points of recall a faster precision may move any figure by (issue 11)
KS = (1, 5, 10)
DIRECTIONS = ("text_to_image", "image_to_text")
CURVE_GAPS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)  # 1 - cosine of the fixed-angle null runs
BATCH = 64  # loupe eval's batch size: the first-batch check sees the same images


def trained_checkpoint(model: str, a) -> Path:
    """`loupe train --model MODEL --steps N` on flickr8k_800 (cached in --workdir), or --trained's file."""
    given = dict(item.split("=", 1) for item in a.trained)
    if model in given:
        return Path(given[model])
    out = a.workdir / f"{model}-{a.steps}steps-seed{a.seed}.pt"
    if not out.exists():
        print(f"  training {model} {a.steps} steps (load {load_average()}) ...", flush=True)
        t = time.perf_counter()
        run_loupe(["train", "--model", model, "--images", FLICKR, "--annotations", CAPTIONS, "--steps", a.steps,
                   "--seed", a.seed, "--device", "cpu", "--out", out], a.workdir / "train-home")
        print(f"  trained in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def cli_eval(ckpt: Path, prec: str, a) -> dict:
    """`loupe eval --precision PREC` in a fresh process, as a user runs it."""
    out = a.workdir / f"eval-{ckpt.stem}-{prec}.json"
    notice = None
    if not (a.reuse_vectors and out.exists()):
        _, proc = run_loupe(["eval", "--images", FLICKR, "--annotations", CAPTIONS, "--checkpoint", ckpt,
                             "--precision", prec, "--batch-size", BATCH, "--json", out], a.workdir / "eval-home")
        notice = proc.stderr.strip()[-300:] or None
    data = json.loads(out.read_text())
    return {"ran": data["model"]["image_precision"], "first_batch_cosine": data["model"]["image_cosine"],
            "recall": {d: {f"R@{k}": data["scores"]["exact"][d][f"R@{k}"] for k in KS} for d in DIRECTIONS},
            "notice": notice}


class Scored:
    """Score matrices both ways for one set of image vectors, and each query's margin at each k.

    margin_k = (best score of a right item) - (k-th best score of a wrong item): the query is a hit
    at k exactly when it is > 0 (ties count against, as `loupe eval`)."""

    def __init__(self, images: np.ndarray, texts: np.ndarray, caption_image: np.ndarray) -> None:
        self.t2i = texts @ images.T  # (captions, images)
        right_t2i = np.zeros(self.t2i.shape, bool)
        right_t2i[np.arange(len(texts)), caption_image] = True
        self.margins = {"text_to_image": _margins(self.t2i, right_t2i), "image_to_text": _margins(self.t2i.T, right_t2i.T)}
        self.ranks = {"text_to_image": _ranks(self.t2i, right_t2i), "image_to_text": _ranks(self.t2i.T, right_t2i.T)}
        self.recall = {d: {f"R@{k}": float(100.0 * np.mean(self.margins[d][:, i] > 0)) for i, k in enumerate(KS)} for d in DIRECTIONS}


def _ranks(scores: np.ndarray, right: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best right item, ties against it (as `loupe eval`)."""
    best = np.where(right, scores, -np.inf).max(axis=1)
    return 1 + np.sum((scores >= best[:, None]) & ~right, axis=1)


def _margins(scores: np.ndarray, right: np.ndarray) -> np.ndarray:
    best = np.where(right, scores, -np.inf).max(axis=1)
    wrong = np.where(right, -np.inf, scores)
    top = -np.sort(np.partition(-wrong, max(KS) - 1, axis=1)[:, : max(KS)], axis=1)  # best wrong scores, descending
    return best[:, None] - top[:, [k - 1 for k in KS]]


def moved(ref: Scored, other: Scored) -> dict:
    """What changed from fp32 to another precision, per direction: recall deltas, flips, margins."""
    out = {}
    change = np.abs(other.t2i - ref.t2i)
    for d in DIRECTIONS:
        m0, m1 = ref.margins[d], other.margins[d]
        row: dict = {"queries": len(m0), "rank_changed": int(np.sum(ref.ranks[d] != other.ranks[d])), "delta": {}, "entered": {}, "left": {}, "flipped_margin_max": {}, "near_ties": {}}
        score_change = change.max(axis=1 if d == "text_to_image" else 0)  # per query: the largest score change
        for i, k in enumerate(KS):
            hit0, hit1 = m0[:, i] > 0, m1[:, i] > 0
            row["delta"][f"R@{k}"] = round(other.recall[d][f"R@{k}"] - ref.recall[d][f"R@{k}"], 3)
            row["entered"][f"R@{k}"] = int(np.sum(~hit0 & hit1))
            row["left"][f"R@{k}"] = int(np.sum(hit0 & ~hit1))
            flipped = hit0 != hit1
            row["flipped_margin_max"][f"R@{k}"] = float(np.abs(m0[flipped, i]).max()) if flipped.any() else None
            # queries whose fp32 margin is within twice their own score change: the ones rounding can flip
            row["near_ties"][f"R@{k}"] = int(np.sum(np.abs(m0[:, i]) <= 2 * score_change))
        row["median_abs_margin_at_5"] = float(np.median(np.abs(m0[:, KS.index(5)])))
        row["score_change_median"], row["score_change_max"] = float(np.median(score_change)), float(score_change.max())
        out[d] = row
    return out


def _turned(ref_images: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`ref_images` each turned by the angle acos(cos) in a random direction (unit rows again)."""
    u = rng.standard_normal(ref_images.shape).astype(np.float32)
    u -= np.sum(u * ref_images, axis=1, keepdims=True) * ref_images
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sin = np.sqrt(np.clip(1.0 - cos**2, 0.0, None))
    return (cos[:, None] * ref_images + sin[:, None] * u).astype(np.float32)


def _worst_moves(ref_images, cos, texts, caption_image, ref: Scored, trials: int, seed: int) -> np.ndarray:
    """Per trial, the largest |recall change| over the six figures, for randomly turned vectors."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        s = Scored(_turned(ref_images, cos, rng), texts, caption_image)
        out.append(max(abs(s.recall[d][f"R@{k}"] - ref.recall[d][f"R@{k}"]) for d in DIRECTIONS for k in KS))
    return np.array(out)


def null_spread(ref_images: np.ndarray, other_images: np.ndarray, texts: np.ndarray, caption_image: np.ndarray,
                ref: Scored, observed: float, trials: int) -> dict:
    """Recall changes of fp32 vectors turned by the same per-photo angle as `other_images`, in random
    directions: what unbiased rounding of that size does to these figures; and how often it moves
    some figure at least as far as the `observed` worst change."""
    cos = np.clip(np.sum(ref_images * other_images, axis=1), -1.0, 1.0)
    worst = _worst_moves(ref_images, cos, texts, caption_image, ref, trials, seed=0)
    return {
        "trials": trials,
        "worst_figure_median": round(float(np.median(worst)), 3),
        "worst_figure_p95": round(float(np.percentile(worst, 95)), 3),
        "share_of_trials_beyond_bound": round(float(np.mean(worst > BOUND + 1e-9)), 3),
        "share_of_trials_at_least_as_bad": round(float(np.mean(worst >= observed - 1e-9)), 3),
    }


def gate_curve(ref_images: np.ndarray, texts: np.ndarray, caption_image: np.ndarray, ref: Scored, trials: int) -> list[dict]:
    """The same null model at fixed cosines (every photo turned by one angle): how close to fp32
    image vectors must stay for this model's recall to stay within the bound."""
    rows = []
    for gap in CURVE_GAPS:
        cos = np.full(len(ref_images), 1.0 - gap, dtype=np.float64)
        worst = _worst_moves(ref_images, cos, texts, caption_image, ref, trials, seed=2)
        rows.append({"cosine": round(1.0 - gap, 7), "worst_figure_median": round(float(np.median(worst)), 3),
                     "worst_figure_max": round(float(worst.max()), 3),
                     "share_of_trials_beyond_bound": round(float(np.mean(worst > BOUND + 1e-9)), 3)})
    return rows


def analyse(ckpt: Path, a) -> dict:
    from loupe.indexer.models.spec import file_sha256
    from loupe.retrieval.eval.annotations import load_annotations
    from loupe.retrieval.eval.evaluate import bind_images, score_embeddings
    from loupe.retrieval.eval.training import decode_all

    encoder = load_checkpoint(ckpt)
    bound = bind_images(load_annotations(CAPTIONS), FLICKR, allow_missing=False)
    caption_image = np.asarray(bound.annotations.caption_image, dtype=np.int64)
    cache = a.workdir / f"vectors-{ckpt.stem}-{file_sha256(ckpt)[:12]}.npz"
    if a.reuse_vectors and cache.exists():  # the slow part (bf16 is emulated without bf16 units), kept per checkpoint
        saved = np.load(cache, allow_pickle=False)
        texts, runs = saved["texts"], json.loads(str(saved["runs"]))
        vectors = {prec: saved[prec] for prec in a.precisions}
    else:
        pixels = decode_all(bound, encoder)  # loupe eval's pixels (the reference pipeline), decoded once
        texts = encoder.encode_texts(bound.annotations.captions, batch_size=256)  # eval's captions: always fp32
        vectors, runs = {}, {}
        for prec in a.precisions:
            encoder.set_image_precision(prec)
            t = time.perf_counter()
            vectors[prec] = np.concatenate([encoder.encode_images(pixels[s : s + BATCH]) for s in range(0, len(pixels), BATCH)])
            runs[prec] = {"ran": encoder.image_precision, "first_batch_cosine": round(encoder.image_cosine, 6),
                          "seconds": round(time.perf_counter() - t, 2), "notice": encoder.precision_notice}
        np.savez(cache, texts=texts, runs=json.dumps(runs), **vectors)
    ref = Scored(vectors["fp32"], texts, caption_image)
    exact = score_embeddings(vectors["fp32"], texts, caption_image, bound.annotations.captions)["exact"]
    same = all(abs(exact[d][f"R@{k}"] - ref.recall[d][f"R@{k}"]) < 1e-9 for d in DIRECTIONS for k in KS)
    if not same:
        raise RuntimeError(f"margins disagree with loupe eval's scoring: {exact} vs {ref.recall}")
    chance = exact["chance"]
    out = {"checkpoint": str(ckpt), "tower": type(encoder.model.visual).__name__, "dim": encoder.dim,
           "recall_fp32": ref.recall, "chance": chance,
           "times_chance_R@10": {d: round(ref.recall[d]["R@10"] / chance[d]["R@10"], 1) for d in DIRECTIONS},
           "precisions": {}}
    if a.curve_trials:
        out["gate_curve"] = gate_curve(vectors["fp32"], texts, caption_image, ref, a.curve_trials)
    for prec in a.precisions:
        if prec == "fp32":
            continue
        row = dict(runs[prec])
        if row["ran"] == "fp32":
            row["verdict"] = f"not applicable: {prec} fell back to fp32 ({row['notice']})"
            out["precisions"][prec] = row
            continue
        cos = np.sum(vectors[prec] * vectors["fp32"], axis=1)
        other = Scored(vectors[prec], texts, caption_image)
        row |= {"cosine_all_photos": {"min": round(float(cos.min()), 6), "median": round(float(np.median(cos)), 6)},
                "recall": other.recall, "moved": moved(ref, other)}
        worst = max(abs(row["moved"][d]["delta"][f"R@{k}"]) for d in DIRECTIONS for k in KS)
        row["worst_abs_delta"] = round(worst, 3)
        row["within_bound"] = worst <= BOUND + 1e-9
        row["null"] = null_spread(vectors["fp32"], vectors[prec], texts, caption_image, ref, worst, a.null_trials)
        out["precisions"][prec] = row
    return out


def report(model: str, res: dict) -> None:
    """The figures in a few lines per model."""
    r = res["recall_fp32"]
    print(f"\n{model} ({res['tower']}, dim {res['dim']}): fp32 t->i R@1/5/10 "
          + "/".join(f"{r['text_to_image'][f'R@{k}']:.2f}" for k in KS) + ", i->t "
          + "/".join(f"{r['image_to_text'][f'R@{k}']:.2f}" for k in KS)
          + f" ({res['times_chance_R@10']['text_to_image']}x / {res['times_chance_R@10']['image_to_text']}x chance at R@10)")
    for prec, row in res["precisions"].items():
        if "moved" not in row:
            print(f"  {prec}: {row['verdict']}")
            continue
        m = row["moved"]
        cells = "  ".join(f"{'t->i' if d == 'text_to_image' else 'i->t'} " + " ".join(f"{m[d]['delta'][f'R@{k}']:+.2f}" for k in KS)
                          for d in DIRECTIONS)
        print(f"  {prec}: first-batch cosine {row['first_batch_cosine']:.5f}, all photos min {row['cosine_all_photos']['min']:.5f}; "
              f"delta vs fp32 {cells}; worst {row['worst_abs_delta']:.2f} -> "
              f"{'within' if row['within_bound'] else 'BEYOND'} the {BOUND}-point bound")
        for d in DIRECTIONS:
            x = m[d]
            print(f"    {d}: rank changed for {x['rank_changed']} queries; entered/left top-k " + ", ".join(f"R@{k} {x['entered'][f'R@{k}']}/{x['left'][f'R@{k}']}" for k in KS)
                  + f" of {x['queries']}; flipped queries' fp32 margin <= "
                  + ", ".join(f"{x['flipped_margin_max'][f'R@{k}']:.5f}" if x['flipped_margin_max'][f'R@{k}'] is not None else "-" for k in KS)
                  + f" (median |margin| at R@5 {x['median_abs_margin_at_5']:.4f}; score change median {x['score_change_median']:.5f},"
                  f" max {x['score_change_max']:.5f})")
        n = row["null"]
        print(f"    null (same angles, random directions, {n['trials']} trials): worst figure moves {n['worst_figure_median']:.2f} "
              f"median, {n['worst_figure_p95']:.2f} p95; beyond the bound in {100 * n['share_of_trials_beyond_bound']:.0f}% of trials; "
              f"at least this precision's {row['worst_abs_delta']:.2f} in {100 * n['share_of_trials_at_least_as_bad']:.0f}%")
    if "gate_curve" in res:
        print("  fixed-angle null, worst figure's move (median / max, share beyond the bound): " + "; ".join(
            f"cos {r['cosine']}: {r['worst_figure_median']:.2f}/{r['worst_figure_max']:.2f} ({100 * r['share_of_trials_beyond_bound']:.0f}%)"
            for r in res["gate_curve"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="loupe-tiny,loupe-tiny-vit")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trained", action="append", default=[], help="MODEL=FILE: a checkpoint of MODEL to use instead of training")
    p.add_argument("--precisions", default="fp32,bf16,int8")
    p.add_argument("--null-trials", type=int, default=40)
    p.add_argument("--curve-trials", type=int, default=10, help="trials per cosine of the fixed-angle null (0: skip)")
    p.add_argument("--reuse-vectors", action="store_true", help="reuse the vectors and `loupe eval` reports a previous run saved for the same checkpoint")
    p.add_argument("--skip-cli", action="store_true", help="only the in-process figures (same code as loupe eval)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loupe-bench-precision-recall"))
    p.add_argument("--out", default="bench_precision_recall.json", help="file name under benchmarks/out")
    a = p.parse_args()
    a.precisions = ["fp32"] + [x for x in a.precisions.split(",") if x and x != "fp32"]
    a.workdir.mkdir(parents=True, exist_ok=True)

    from loupe.indexer.models.precision import cpu_has_bf16

    out = {"machine": machine(), "bound_points": BOUND, "cpu_has_bf16": cpu_has_bf16(), "steps": a.steps, "models": {}}
    print(f"{out['machine']['cpu']}: bf16 units {out['cpu_has_bf16']}, load {load_average()}", flush=True)
    for model in [m for m in a.models.split(",") if m]:
        ckpt = trained_checkpoint(model, a)
        res = analyse(ckpt, a)
        if not a.skip_cli:
            res["cli"] = {prec: cli_eval(ckpt, prec, a) for prec in a.precisions}
            for prec, row in res["cli"].items():
                if row["ran"] == prec:
                    inproc = res["recall_fp32"] if prec == "fp32" else res["precisions"][prec]["recall"]
                    row["agrees_with_in_process"] = all(
                        math.isclose(row["recall"][d][f"R@{k}"], inproc[d][f"R@{k}"], abs_tol=1e-6) for d in DIRECTIONS for k in KS)
                    row["delta_vs_cli_fp32"] = {d: {f"R@{k}": round(row["recall"][d][f"R@{k}"] - res["cli"]["fp32"]["recall"][d][f"R@{k}"], 3)
                                                    for k in KS} for d in DIRECTIONS}
        out["models"][model] = res
        report(model, res)
        if "cli" in res:
            print("  loupe eval (CLI): " + "; ".join(
                f"{p_}: ran {r['ran']}, agrees {r.get('agrees_with_in_process', '-')}" for p_, r in res["cli"].items()))
        write_json(a.out, out)  # after each model: a run cut short keeps what it measured
    out["load_average_at_end"] = load_average()
    write_json(a.out, out)


if __name__ == "__main__":
    main()
