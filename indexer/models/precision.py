"""Which arithmetic embeds images on this machine, and the rule that keeps an index faithful to fp32.

fp32 is the reference. A faster precision is used only where the hardware runs it fast, and only
while its vectors stay within `MIN_COSINE` of fp32 for the loaded model: models differ, so the
encoder checks it at run time on the first images it embeds (`Encoder.set_image_precision`).

On CPUs `auto` is fp32 (ONNX Runtime where installed), except for a large `loupe index` run on a
CPU with bf16 units, which takes bf16 (`BF16_MIN_IMAGES`, `factory.bulk_spec`); int8 is an opt-in
(`--precision int8`). Measured on models trained here (benchmarks/bench_precision_recall.py,
RESULTS.md): what they change in `loupe eval` recall is near-ties changing places, as much as
unbiased noise of the same angle changes, and that grows with the angle and shrinks with training:
on models trained 300 steps bf16 moved recall by 0.03 and 0.28 points (within the 0.3 allowed;
0.38 on a model trained 100 steps), int8 by 0.47 on the ViT (beyond).

- bf16: the image tower's weights cast once to bfloat16 (not autocast, which is slower on CPU).
  Fast only on CPUs with bf16 matrix units (Intel AMX, AVX512-BF16); elsewhere it is emulated.
- int8: dynamic quantisation of the tower's Linear layers (weights int8, activations quantised
  per batch), attention projections included (`loupe.indexer.models.quantize`). Pays on x86 CPUs for
  transformer towers, whose work is mostly in those layers.
- fp16: CUDA's mixed precision (autocast), as loupe always ran on NVIDIA GPUs, checked the same way.

An index records, per precision that made its vectors, the lowest cosine to fp32 its checks
measured (catalog setting `image_precision`). Vectors of two precisions may share an index only if,
in the worst case (their angles to fp32 add up), a photo's two vectors stay within the bound.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
from typing import Mapping

from loupe.indexer.errors import LoupeError

PRECISIONS = ("fp32", "bf16", "int8")
# bf16 weights are the fastest CPU arithmetic where the CPU has bf16 units. `auto` on CPUs is fp32, run
# by ONNX Runtime where it is installed (`factory.image_backend`; no torch at all once its tower is
# cached), which starts ~3.5 s sooner than torch: bf16 is the default only for large runs (below).
BF16_BY_DEFAULT = False
# ... except for a large run: `loupe index` embedding at least this many images on a CPU with bf16 units
# takes torch with bf16 weights (4.6x ONNX Runtime fp32 per image on an AMX CPU, 1.9x on an AMD EPYC with
# AVX512-BF16), which repays torch's start-up (~3.5 s more than the torch-free ONNX path) from about
# 200 photos on; recall within 0.3 points of fp32 on trained models (RESULTS.md, "Quiet re-run with
# 300-step models"), and the run's first images are checked within `MIN_COSINE` of fp32 as always.
BF16_MIN_IMAGES = 200
CHOICES = ("auto", *PRECISIONS)
TEXT_CHOICES = ("auto", "fp32", "bf16")  # of query text (`Encoder.set_text_precision`)
MIN_COSINE = 0.999  # image (and query text) vectors of a faster precision must stay this close to fp32
FIDELITY_SAMPLE = 4  # images of the first batch embedded in fp32 too, to check the faster precision
SETTING = "image_precision"
INT8_MIN_LINEAR_SHARE = 0.5  # int8 pays when Linear layers hold most of the tower's weights (ViT, not ResNet)


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (Intel AMX or AVX512-BF16): from the
    flags Linux lists (no torch import: `factory.bulk_spec` asks before torch is needed), else
    from torch's own probes."""
    flags = cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(probe()) for probe in probes if probe is not None)
    except RuntimeError:
        return False


def linear_share(module: "torch.nn.Module") -> float:
    """Share of `module`'s weights that int8 dynamic quantisation would convert (plain nn.Linear)."""
    import torch

    total = sum(p.numel() for p in module.parameters())
    linear = sum(m.weight.numel() for m in module.modules() if type(m) is torch.nn.Linear)
    return linear / total if total else 0.0


def int8_pays(visual: "torch.nn.Module") -> bool:
    """int8 is faster than fp32 here: an x86 CPU (fbgemm/x86 kernels, AVX2 or better) and a vision
    transformer, whose work is mostly in Linear layers (measured on ViT-B-32: benchmarks/RESULTS.md).
    Convolutional towers gain little, and ModifiedResNet's attention pool cannot run quantised."""
    import torch

    x86 = platform.machine().lower() in ("x86_64", "amd64") and "x86" in torch.backends.quantized.supported_engines
    avx2 = "avx2" in cpu_flags() or not os.path.exists("/proc/cpuinfo")
    vit = "VisionTransformer" in type(visual).__name__
    return x86 and avx2 and vit and linear_share(visual) >= INT8_MIN_LINEAR_SHARE


def fastest(device: "torch.device", visual: "torch.nn.Module") -> str:
    """The fastest precision this device runs for this tower within `MIN_COSINE`: bf16 on CPUs with
    bf16 units, int8 on other x86 CPUs where it pays, fp32 otherwise; fp16 (mixed precision) on CUDA."""
    if device.type == "cuda":
        return "fp16"
    if device.type != "cpu":
        return "fp32"
    if cpu_has_bf16():
        return "bf16"
    return "int8" if int8_pays(visual) else "fp32"


def resolve(precision: str, device: "torch.device", visual: "torch.nn.Module") -> str:
    """The precision to run: `auto` becomes fp16 (mixed precision) on CUDA and fp32 elsewhere (on
    CPUs the faster ones can move recall by more than 0.3 points: module docstring). An explicit
    choice is kept where the device can run it at all."""
    if precision not in CHOICES:
        raise LoupeError(f"unknown precision '{precision}': use {', '.join(CHOICES)}")
    kind = device.type
    if precision == "auto":
        return "fp16" if kind == "cuda" else "fp32"
    if precision == "int8" and kind != "cpu":
        raise LoupeError(f"--precision int8 runs on CPUs only, not {kind}: use auto, fp32 or bf16")
    if precision == "bf16" and kind not in ("cpu", "cuda"):
        raise LoupeError(f"--precision bf16 is not supported on {kind}: use auto or fp32")
    return precision


def resolve_text(precision: str, device: "torch.device") -> str:
    """The precision query text runs in: `auto` is fp32 on CPUs (the exported ONNX tower's, so every
    search path scores alike) and fp16 (mixed precision) on CUDA; bf16 is a CPU opt-in."""
    if precision not in TEXT_CHOICES:
        raise LoupeError(f"unknown text precision '{precision}': use {', '.join(TEXT_CHOICES)}")
    if device.type == "cuda":
        return "fp16"
    if device.type != "cpu":
        return "fp32"
    return "fp32" if precision == "auto" else precision


def lowered(visual: "torch.nn.Module", precision: str) -> "torch.nn.Module":
    """A copy of the image tower in `precision` (the fp32 tower is kept until the check passes)."""
    import torch

    if precision == "bf16":
        return copy.deepcopy(visual).to(torch.bfloat16)
    if precision == "int8":
        from loupe.indexer.models.quantize import quantize_int8

        return quantize_int8(visual)
    raise ValueError(precision)


def combined_cosine(a: float, b: float) -> float:
    """The worst cosine between two vectors whose cosines to a third are `a` and `b` (angles add)."""
    angle = math.acos(max(-1.0, min(1.0, a))) + math.acos(max(-1.0, min(1.0, b)))
    return math.cos(min(angle, math.pi))


def parse_record(value: str | None) -> dict[str, float]:
    """The catalog setting: {precision: lowest cosine to fp32 measured}; {} for an older index."""
    if not value:
        return {}
    try:
        data = json.loads(value)
        return {str(k): float(v) for k, v in data.items()}
    except (ValueError, AttributeError, TypeError):
        return {}


def format_record(record: Mapping[str, float]) -> str:
    return json.dumps({k: record[k] for k in sorted(record)}, sort_keys=True)


def admit(record: Mapping[str, float], precision: str, cosine: float, bound: float = MIN_COSINE) -> dict[str, float]:
    """The index's record once vectors of `precision` (cosine `cosine` to fp32) join it.

    Refused with a one-line error when a photo's vector from this run and one already in the
    index could differ by more than `bound` (worst case). Vectors of one precision are one
    arithmetic and always agree with each other.
    """
    worst, other = _worst(record, precision, cosine)
    if worst < bound:
        fits = [p for p in sorted(record, key=lambda p: (p != "fp32", p)) if record[p] >= bound and _worst(record, p, record[p])[0] >= bound]
        fix = f"pass --precision {fits[0]}" if fits else f"pass --min-cosine {math.floor(worst * 1e4) / 1e4} to accept it"
        raise LoupeError(
            f"this index holds {other} image vectors (cosine {record[other]:.5f} to fp32); {precision} vectors "
            f"(cosine {cosine:.5f}) could differ from them by cosine {worst:.5f}, beyond the bound {bound}: "
            f"{fix}, or re-index into another --home/--db"
        )
    out = dict(record)
    floor = math.floor(cosine * 1e6) / 1e6  # recorded rounded down: never better than measured
    out[precision] = min(out.get(precision, 1.0), floor)
    return out


def _worst(record: Mapping[str, float], precision: str, cosine: float) -> tuple[float, str | None]:
    """The worst cosine between a vector of `precision` and one of another precision in `record`."""
    pairs = [(combined_cosine(cosine, c), p) for p, c in record.items() if p != precision]
    return min(pairs, default=(1.0, None))


def describe_record(record: Mapping[str, float]) -> str:
    """How `loupe info` shows it, e.g. 'int8 (cosine >= 0.99962 to fp32), fp32'."""
    if not record:
        return "not recorded (an older loupe: fp32 on CPU)"
    parts = []
    for p in sorted(record, key=lambda p: (p != "fp32", p)):
        c = record[p]
        parts.append(p if c >= 1.0 else f"{p} (cosine >= {c:.5f} to fp32)")
    return ", ".join(parts)


def describe_backends(record: Mapping[str, float]) -> str:
    """What ran the image tower for an index's vectors, e.g. 'ONNX Runtime (fp32), torch (fp32)'."""
    if not record:
        return "torch (not recorded: an older loupe)"
    names = sorted(record, key=lambda p: (not p.startswith("onnx-"), p))
    return ", ".join(f"ONNX Runtime ({p[5:]})" if p.startswith("onnx-") else f"torch ({p})" for p in names)
