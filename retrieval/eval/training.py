"""`loupe train`: contrastive fine-tuning of an open_clip model on your own (image, caption) pairs.

Small-data design: every training image is decoded once (through `decode_image`'s reference
mode, so training sees exactly the pixels `loupe eval` scores) into an in-memory tensor, and every caption is tokenized
once, so a step costs only the model. A frozen tower (`--freeze-image`: locked-image tuning)
is run once over the data and its features cached, which makes LiT nearly free on a CPU.
The recipe follows open_clip's trainer: AdamW (betas 0.9/0.98, eps 1e-6, no weight decay on
gains, biases and logit_scale), linear warm-up then cosine decay, open_clip's own loss.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.retrieval.eval.annotations import load_annotations
from loupe.retrieval.eval.evaluate import BoundSet, bind_images, score_embeddings

# The decoded-image cache lives in RAM; past this it is the wrong tool (stream from disk instead).
MAX_CACHE_BYTES = int(os.environ.get("LOUPE_TRAIN_CACHE_BYTES", 8 << 30))
DEFAULT_EPOCHS = 10
LR_FROM_SCRATCH = 1e-3
LR_FINE_TUNE = 1e-5


@dataclass
class TrainOptions:
    """What `loupe train` takes; None for lr/epochs/steps means 'choose for me' (see `train`)."""

    images: Path  # the folder the annotations' file names are relative to
    annotations: Path  # captions per image (`loupe.retrieval.eval.annotations`)
    out: Path  # the checkpoint written, in loupe's format (config + weights)
    model: str | None = None  # an open_clip architecture, trained from scratch unless pretrained/checkpoint
    pretrained: str | None = None  # an open_clip tag to fine-tune
    checkpoint: Path | None = None  # a loupe checkpoint to fine-tune
    epochs: int | None = None  # with steps, whichever ends first
    steps: int | None = None
    batch_size: int = 128  # capped at the number of images
    lr: float | None = None  # peak of the cosine schedule
    weight_decay: float = 0.1  # on weights, not on biases, norms or embeddings (`param_groups`)
    warmup: float = 0.1  # fraction of the steps, linear from 0
    seed: int = 0  # shuffling and a from-scratch model's initial weights
    device: str = "auto"
    freeze_image: bool = False
    freeze_text: bool = False
    val_images: Path | None = None
    val_annotations: Path | None = None
    workers: int | None = None
    progress: bool = False


@dataclass
class TrainResult:
    out: Path
    steps: int
    epochs: float
    final_loss: float
    seconds: float
    history: list[dict] = field(default_factory=list)


def decode_all(bound: BoundSet, encoder: "Encoder", workers: int | None = None) -> "torch.Tensor":
    """Decode and preprocess every image of `bound` once into one (N, 3, H, W) float tensor,
    with the pixels `loupe eval` uses (the reference pipeline)."""
    import torch

    from loupe.indexer.pipeline.stages import reason_for
    from loupe.indexer.pipeline.stages import decode_paths

    n, size = len(bound.paths), encoder.image_size
    need = n * 3 * size * size * 4
    if need > MAX_CACHE_BYTES:
        raise LoupeError(
            f"{n} images at {size}px need {need / 2**30:.1f} GiB of RAM to cache; train on a subset "
            f"or raise LOUPE_TRAIN_CACHE_BYTES"
        )
    cache: torch.Tensor | None = None
    bad: list[str] = []
    for i, result in decode_paths(bound.paths, size, encoder.preprocess, workers, reference=True):
        if isinstance(result, BaseException):
            bad.append(f"{bound.paths[i].name} ({reason_for(result)})")
            continue
        if cache is None:
            cache = torch.empty((n, *result.shape), dtype=result.dtype)
        cache[i] = result
    if bad:
        raise LoupeError(f"{len(bad)} training images could not be read: {', '.join(bad[:5])}")
    assert cache is not None
    return cache


def caption_table(caption_image: list[int], n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_images, max captions) caption indices padded with -1, and each image's caption count."""
    counts = np.bincount(np.asarray(caption_image, dtype=np.int64), minlength=n_images)
    table = np.full((n_images, max(1, int(counts.max()))), -1, dtype=np.int64)
    filled = np.zeros(n_images, dtype=np.int64)
    for c, i in enumerate(caption_image):
        table[i, filled[i]] = c
        filled[i] += 1
    return table, counts


def lr_at(step: int, total: int, base: float, warmup_steps: int) -> float:
    """Linear warm-up to `base`, then cosine decay to zero (open_clip's `cosine_lr`)."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base


def _is_image_param(name: str) -> bool:
    return name.startswith("visual.")


def _is_shared_param(name: str) -> bool:
    return name.startswith("logit_")


def param_groups(model: "torch.nn.Module", weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; gains, biases, norms and logit_scale are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or _is_shared_param(name)
        (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def freeze(model: "torch.nn.Module", image: bool, text: bool) -> None:
    """Stop gradients into the chosen towers (logit_scale stays trainable)."""
    for name, p in model.named_parameters():
        if _is_shared_param(name):
            continue
        if (image and _is_image_param(name)) or (text and not _is_image_param(name)):
            p.requires_grad_(False)


def _set_train_mode(model: "torch.nn.Module", freeze_image: bool, freeze_text: bool) -> None:
    """Train mode for trainable towers only: a frozen tower keeps its BatchNorm statistics."""
    model.train()
    for name, child in model.named_children():
        if (freeze_image and name == "visual") or (freeze_text and name != "visual"):
            child.eval()


def _batched(fn: Callable, items, batch_size: int) -> "torch.Tensor":
    import torch

    return torch.cat([fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


def save_checkpoint(path: Path, model_name: str, model: "torch.nn.Module", metadata: dict) -> None:
    """loupe's format ({"model_name", "state_dict", "loupe": metadata}), written atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model_name": model_name, "state_dict": state, "loupe": metadata}, tmp)
    os.replace(tmp, path)


class _Validator:
    """Scores a validation set each epoch from decoded-once images."""

    def __init__(self, images: Path, annotations: Path, encoder: "Encoder", workers: int | None) -> None:
        self.bound = bind_images(load_annotations(annotations), images, allow_missing=False)
        self.pixels = decode_all(self.bound, encoder, workers)
        self.encoder = encoder

    def __call__(self, batch_size: int) -> dict:
        ann = self.bound.annotations
        image_emb = np.concatenate(
            [self.encoder.encode_images(self.pixels[i : i + batch_size]) for i in range(0, len(self.pixels), batch_size)]
        )
        text_emb = self.encoder.encode_texts(ann.captions, batch_size=max(256, batch_size))
        return score_embeddings(image_emb, text_emb, ann.caption_image, ann.captions)


def _val_line(scores: dict) -> str:
    def triple(s: dict) -> str:
        return "/".join(f"{s[f'R@{k}']:.1f}" for k in (1, 5, 10))

    view = scores.get("same_caption") or scores["exact"]
    name = "same-caption" if "same_caption" in scores else "exact"
    return f"val ({name}) R@1/5/10 text->image {triple(view['text_to_image'])}, image->text {triple(view['image_to_text'])}"


def train(opts: TrainOptions, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune (or train from a config) and save a loupe checkpoint; returns what happened."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss, SigLipLoss

    from loupe.indexer.models.factory import index_encoder
    from loupe.indexer.models.spec import resolve_spec

    if opts.freeze_image and opts.freeze_text:
        raise LoupeError("--freeze-image and --freeze-text together leave nothing to train")
    if (opts.val_images is None) != (opts.val_annotations is None):
        raise LoupeError("pass --val-images and --val-annotations together")
    if (opts.steps is not None and opts.steps < 1) or (opts.epochs is not None and opts.epochs < 1):
        raise LoupeError("--steps and --epochs must be at least 1")
    ann = load_annotations(opts.annotations)
    bound = bind_images(ann, opts.images, allow_missing=False)
    spec = resolve_spec(opts.model, opts.pretrained, opts.checkpoint, allow_random=True)  # a bare config trains from scratch
    from_scratch = not (spec.pretrained or spec.checkpoint)
    base_lr = opts.lr if opts.lr is not None else (LR_FROM_SCRATCH if from_scratch else LR_FINE_TUNE)

    random.seed(opts.seed)
    np.random.seed(opts.seed)
    torch.manual_seed(opts.seed)  # random init of a from-scratch model depends on it
    encoder = index_encoder(spec, opts.device)
    model, device = encoder.model, encoder.device
    started = time.perf_counter()
    pixels = decode_all(bound, encoder, opts.workers)
    tokens = encoder.tokenizer(bound.annotations.captions)
    table, counts = caption_table(bound.annotations.caption_image, len(bound.paths))
    validator = (
        _Validator(opts.val_images, opts.val_annotations, encoder, opts.workers) if opts.val_images else None
    )
    log(
        f"training {spec.describe()} on {len(bound.paths)} images / {len(tokens)} captions "
        f"(decoded in {time.perf_counter() - started:.1f}s) on {device}"
    )

    freeze(model, opts.freeze_image, opts.freeze_text)
    model.eval()
    image_feats = text_feats = None
    if opts.freeze_image:  # a frozen tower gives the same features every step: compute them once
        with torch.no_grad():
            image_feats = _batched(lambda x: model.encode_image(x.to(device)).float(), pixels, 256)
    if opts.freeze_text:
        with torch.no_grad():
            text_feats = _batched(lambda x: model.encode_text(x.to(device)).float(), tokens, 256)

    n = len(bound.paths)
    batch = min(opts.batch_size, n)
    if batch < 2:
        raise LoupeError("contrastive training needs at least 2 images")
    steps_per_epoch = n // batch
    if opts.steps is None:
        total = (opts.epochs or DEFAULT_EPOCHS) * steps_per_epoch
    else:
        total = opts.steps if opts.epochs is None else min(opts.steps, opts.epochs * steps_per_epoch)
    warmup_steps = max(1, round(opts.warmup * total))
    optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=base_lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = SigLipLoss() if getattr(model, "logit_bias", None) is not None else ClipLoss()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and torch.cuda.is_bf16_supported()
        else torch.autocast("cpu", enabled=False)
    )
    log(
        f"{total} steps of batch {batch} ({total / steps_per_epoch:.1f} epochs), lr {base_lr:g} "
        f"(warm-up {warmup_steps} steps, cosine), weight decay {opts.weight_decay:g}, seed {opts.seed}"
        + (", image tower frozen" if opts.freeze_image else "")
        + (", text tower frozen" if opts.freeze_text else "")
    )

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(opts.seed)
    history: list[dict] = []
    bar = tqdm(total=total, desc="training", unit="step", disable=not opts.progress, dynamic_ncols=True)
    step, epoch, smooth = 0, 0, float("nan")
    max_log_scale = math.log(100.0)
    try:
        while step < total:
            perm = torch.randperm(n, generator=gen)
            pick = (torch.rand(n, generator=gen) * torch.as_tensor(counts)).long()
            epoch_losses: list[float] = []
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perm[b * batch : (b + 1) * batch]
                caps = torch.as_tensor(table[idx.numpy(), pick[idx].numpy()])
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, base_lr, warmup_steps)
                _set_train_mode(model, opts.freeze_image, opts.freeze_text)
                with autocast:
                    img = image_feats[idx] if image_feats is not None else model.encode_image(pixels[idx].to(device))
                    txt = text_feats[caps] if text_feats is not None else model.encode_text(tokens[caps].to(device))
                    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
                    loss = loss_fn(img, txt, model.logit_scale.exp(), getattr(model, "logit_bias", None))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, max_log_scale)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise LoupeError(f"loss became {value} at step {step + 1}: lower --lr")
                epoch_losses.append(value)
                smooth = value if math.isnan(smooth) else 0.9 * smooth + 0.1 * value
                step += 1
                bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
                bar.update(1)
            epoch += 1
            record = {"epoch": epoch, "step": step, "loss": float(np.mean(epoch_losses))}
            line = f"epoch {epoch} step {step}/{total} loss {record['loss']:.4f}"
            if validator is not None:
                model.eval()
                record["val"] = validator(batch)
                line += " | " + _val_line(record["val"])
            history.append(record)
            bar.clear()
            log(line)
    finally:
        bar.close()
    model.eval()
    seconds = time.perf_counter() - started
    save_checkpoint(
        opts.out,
        spec.model,
        model,
        {
            "base": spec.describe(),
            "trained_on": str(Path(opts.annotations).resolve()),
            "images": n,
            "captions": len(tokens),
            "steps": step,
            "batch_size": batch,
            "lr": base_lr,
            "seed": opts.seed,
            "freeze_image": opts.freeze_image,
            "freeze_text": opts.freeze_text,
            "final_loss": history[-1]["loss"],
        },
    )
    log(f"saved {opts.out} after {step} steps in {seconds:.1f}s")
    return TrainResult(Path(opts.out), step, step / steps_per_epoch, history[-1]["loss"], seconds, history)
