"""eval and train: option parsing and printing only; the work is in loupe.retrieval.eval.evaluate/training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from loupe.cli.app import app
from loupe.cli.options import (
    AnnOptions, BackendOpt, BatchOpt, CheckpointOpt, DeviceOpt, MinCosineOpt, ModelOpt, ModelOptions, PrecisionOpt,
    PretrainedOpt, grouped,
)

ImagesOpt = Annotated[Path, typer.Option("--images", "-i", help="Folder holding the annotated images.")]
AnnotationsOpt = Annotated[
    Path,
    typer.Option("--annotations", "-a", help="Karpathy dataset_*.json (test split), LAVIS/CLIP_benchmark json, or captions.json."),
]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-w", min=1, help="Decode threads (default: one per core).")]


def _show_progress() -> bool:
    return sys.stderr.isatty() or os.environ.get("LOUPE_PROGRESS") == "1"


@app.command("eval")
@grouped
def eval_command(
    images: ImagesOpt,
    annotations: AnnotationsOpt,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON to this file ('-' for stdout).")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Score the images that exist when some are missing or unreadable (flagged as a subset).")] = False,
    index_factory: Annotated[Optional[str], typer.Option("--index-factory", help="Also score through this FAISS index (e.g. HNSW32, IVF256,Flat) to see what approximation costs.")] = None,
    approx: AnnOptions = AnnOptions(),
    model: ModelOptions = ModelOptions(),
    precision: PrecisionOpt = "fp32",
    backend: BackendOpt = "torch",
    min_cosine: MinCosineOpt = 0.999,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
) -> None:
    """Recall@1/5/10 of a model on a captioned image set, text->image and image->text (exact search).

    Images are embedded by torch in fp32 (the reference) unless --precision/--backend say otherwise
    (`--precision auto --backend auto`, to score what `loupe index` would store).
    """
    from loupe.indexer.models.factory import index_encoder
    from loupe.indexer.models.spec import resolve_spec
    from loupe.indexer.storage.vectors import parse_search_params
    from loupe.retrieval.eval.annotations import load_annotations
    from loupe.retrieval.eval.evaluate import ALLOW_MISSING_HINT, bind_images, evaluate

    params = approx.joined()
    parse_search_params(params)  # a bad string fails before any work
    ann = load_annotations(annotations)
    bind_images(ann, images, allow_missing, ALLOW_MISSING_HINT)  # fail on data before loading a model
    spec = resolve_spec(model.model, model.pretrained, model.checkpoint).replace(image_precision=precision, image_backend=backend)
    encoder = index_encoder(spec, model.device, min_cosine)
    report = evaluate(
        images, ann, encoder, batch_size=batch_size, allow_missing=allow_missing,
        index_factory=index_factory, workers=workers, progress=_show_progress(), search_params=params,
    )
    if encoder.precision_notice:
        typer.echo(f"loupe: {encoder.precision_notice}", err=True)
    text = json.dumps(report.to_json(), indent=2)
    if json_out is not None and str(json_out) == "-":
        typer.echo(text)
        return
    typer.echo(report.format())
    if encoder.image_precision != "fp32":
        typer.echo(f"images embedded in {encoder.image_precision} (cosine >= {encoder.image_cosine:.5f} to fp32 on the first images)")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n", encoding="utf-8")
        typer.echo(f"wrote {json_out}")


@app.command()
def train(
    images: ImagesOpt,
    annotations: AnnotationsOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (load it with --checkpoint).")],
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Passes over the images (default 10 unless --steps).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps; with --epochs, whichever ends first.")] = None,
    batch_size: BatchOpt = 128,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 1e-3 from scratch, 1e-5 fine-tuning).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay on weight matrices.")] = 0.1,
    warmup: Annotated[float, typer.Option("--warmup", min=0.0, max=1.0, help="Fraction of steps spent warming up.")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Seeds init, shuffling and caption choice.")] = 0,
    freeze_image: Annotated[bool, typer.Option("--freeze-image", help="Keep the image tower fixed (locked-image tuning).")] = False,
    freeze_text: Annotated[bool, typer.Option("--freeze-text", help="Keep the text tower fixed.")] = False,
    val_images: Annotated[Optional[Path], typer.Option("--val-images", help="Validation image folder (recall printed each epoch).")] = None,
    val_annotations: Annotated[Optional[Path], typer.Option("--val-annotations", help="Validation annotations.")] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
) -> None:
    """Train an open_clip model on your (image, caption) pairs with open_clip's contrastive loss.

    Start from a pretrained tag, a checkpoint, or a bare config (e.g. --model loupe-tiny).
    """
    from loupe.retrieval.eval.training import TrainOptions
    from loupe.retrieval.eval.training import train as run_training

    run_training(
        TrainOptions(
            images=images, annotations=annotations, out=out, model=model, pretrained=pretrained,
            checkpoint=checkpoint, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, warmup=warmup, seed=seed, device=device,
            freeze_image=freeze_image, freeze_text=freeze_text, val_images=val_images,
            val_annotations=val_annotations, workers=workers, progress=_show_progress(),
        ),
        log=typer.echo,
    )
