"""index, index-text, search, info, check, remove, models: option parsing and printing only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from loupe.cli.app import app, fail, open_store, writing
from loupe.cli.options import (
    AnnOptions, BackendOpt, BatchOpt, CheckpointOpt, DbOpt, DeviceOpt, HomeOpt, JsonOpt, LocationOptions, MinCosineOpt,
    ModelOpt, ModelOptions, NoWaitOpt, PrecisionOpt, PretrainedOpt, TextPrecisionOpt, grouped,
)


class _Loader:
    """The encoder of a `loupe index` run, made on first need (by the first folder that embeds
    anything, which says how many files: `factory.bulk_spec`) and then shared by every folder."""

    def __init__(self, make) -> None:
        self.make, self.encoder = make, None

    def __call__(self, images: int | None = None):
        if self.encoder is None:
            self.encoder = self.make(images)
        return self.encoder

    @property
    def loaded(self) -> bool:
        return self.encoder is not None


def _encoder_for(store, model, pretrained, checkpoint, device, precision: str = "auto", min_cosine: float = 0.999,
                 backend: str = "auto", images_only: bool = False, images: int | None = None):
    """The model to index with: the options if given, else the one the index is bound to.
    `images_only`: it embeds photos only, in this process (then it may need no torch)."""
    from loupe.indexer.models.factory import index_encoder
    from loupe.indexer.models.spec import resolve_spec, spec_of_meta

    spec = resolve_spec(model, pretrained, checkpoint, spec_of_meta(store.meta())).replace(
        image_precision=precision, image_backend=backend)
    # image precision checked against fp32 on the first batch
    return index_encoder(spec, device, min_cosine, images_for=store.location if images_only else None, images=images)


def _show_progress() -> bool:
    return sys.stderr.isatty() or os.environ.get("LOUPE_PROGRESS") == "1"


@app.command()
def index(
    ctx: typer.Context,
    folders: Annotated[Optional[List[Path]], typer.Argument(help="Photo folders to index (re-runs only embed what changed).")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    min_cosine: MinCosineOpt = 0.999,
    batch_size: BatchOpt = 32,
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", min=1, help="Decode threads (default: one per core).")] = None,
    index_factory: Annotated[Optional[str], typer.Option("--index-factory", help="FAISS factory string for the vector index, e.g. 'IVF1024,SQ8' or 'HNSW32,Flat'; kept for later runs ('auto': chosen by size).")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Forget the files under the folders that are missing (not found), and their vectors; never applied to an offline folder.")] = False,
    home: HomeOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    no_wait: NoWaitOpt = False,
    files: Annotated[Optional[Path], typer.Option("--files", help="Index the files listed in FILE (a text file, one path a line, or parquet with a 'path' column) instead of or besides folders.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Read, decode and embed on a Ray cluster (`--ray=ADDRESS`, or a local one started with --workers CPUs); the catalog is written here. Needs `pip install 'loupe\\[ray]'`.")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster address for --ray (default: start a local cluster).")] = None,
    actors: Annotated[Optional[int], typer.Option("--actors", min=1, help="With --ray: embedding actors (default: one per GPU, else 1).")] = None,
    no_video: Annotated[bool, typer.Option("--no-video", help="Skip videos (mp4, mov, m4v, mkv, webm, avi, 3gp, mts); videos indexed before are kept.")] = False,
    no_ocr: Annotated[bool, typer.Option("--no-ocr", help="Do not read text in photos (it is read in a second pass after the embeddings; a later run without --no-ocr catches up).")] = False,
) -> None:
    """Index photo and video folders; re-runs embed only new or changed files.

    A video gets one vector per scene (at least one per 10 s), with its time, so a search opens
    it at the right moment.

    Moved or duplicate files reuse their vector. Files not found are kept as missing (hidden
    from results, back without re-embedding when they reappear) until --prune or `loupe remove`;
    a folder that is gone or empty where photos were indexed (an unplugged drive) is reported
    offline and nothing is removed. Bad files are skipped, kept with their reason, and listed.
    """
    from loupe.indexer.pipeline.indexing import index_files, index_folder
    from loupe.indexer.models.precision import CHOICES

    if precision not in CHOICES:
        raise fail(f"unknown precision '{precision}': use {', '.join(CHOICES)}")
    from loupe.indexer.models.spec import IMAGE_BACKENDS

    if backend not in IMAGE_BACKENDS:
        raise fail(f"unknown backend '{backend}': use {', '.join(IMAGE_BACKENDS)}")
    if backend == "onnx" and precision not in ("auto", "fp32"):
        raise fail(f"--backend onnx runs fp32 only, not --precision {precision}: drop one of them")
    folders = list(folders or [])
    if not folders and files is None:
        raise fail("give photo folders to index, or --files LIST")
    ray = ray or ray_address is not None
    if ray:
        from loupe.indexer.pipeline.ray_runner import require_ray

        require_ray()  # before any work: one line naming the extra
    _check_folders(folders, home, db)
    store = open_store(home, db)
    ctx.with_resource(writing(store, no_wait))  # held until the command returns
    meta = store.meta()

    load = _Loader(lambda images: _encoder_for(store, model, pretrained, checkpoint, device, precision, min_cosine, backend,
                                               images_only=not ray, images=images))
    # the index's model is loaded only once a file needs embedding: a no-change re-scan never loads it;
    # model options are checked against the index's binding by name, tag and checkpoint hash
    if meta is not None and (model or pretrained or checkpoint):
        from loupe.indexer.models.spec import check_bound, resolve_spec, spec_of_meta

        check_bound(meta, resolve_spec(model, pretrained, checkpoint, spec_of_meta(meta)), meta.dim)
    encoder = load  # loaded by the run once it knows how many files need embedding (none: never)
    if index_factory:
        store.set_index_factory(index_factory, meta.dim if meta is not None else load().dim)
    sources = [(f, False) for f in folders] + ([(files, True)] if files is not None else [])
    signals = _signals(no_ocr)
    for folder, is_list in sources:
        if ray:
            from loupe.indexer.pipeline.ray_runner import index_on_ray

            report = index_on_ray(
                store, encoder, str(folder), files=is_list, address=ray_address, num_cpus=workers,
                batch_size=batch_size, actors=actors, device=device, progress=_show_progress(), prune=prune, signals=signals,
            )
        elif is_list:
            report = index_files(store, encoder, folder, batch_size=batch_size, workers=workers, progress=_show_progress(), signals=signals)
        else:
            report = index_folder(
                store, encoder, folder, batch_size=batch_size, workers=workers, progress=_show_progress(), prune=prune,
                video=not no_video,
                signals=signals,
            )
        notice = load.loaded and load().precision_notice
        if notice:
            typer.echo(f"loupe: {notice}", err=True)
            load().precision_notice = None  # once per run
        if as_json:
            out = {k: v for k, v in vars(report).items() if k != "bad_files"}
            out["bad_files"] = [{"path": p, "reason": r} for p, r in report.bad_files]
            out["model_loaded"] = load.loaded
            typer.echo(json.dumps(out))
        else:
            _print_index_report(report)
        if report.interrupted:
            typer.echo("loupe: interrupted; everything committed so far is kept, re-run to continue", err=True)
            raise typer.Exit(130)
    if load.loaded:  # the model is loaded anyway: cache its text tower for cold searches
        from loupe.indexer.models.factory import cache_text_tower

        cache_text_tower(load(), store.location, store.meta(), on_error=lambda exc: typer.echo(
            f"loupe: note: could not cache the text tower for fast searches ({exc})", err=True))


def _signals(no_ocr: bool):
    """The signals a `loupe index` runs: every registered one, less OCR with --no-ocr."""
    from loupe.indexer.signals.ocr import NAME
    from loupe.indexer.signals.registry import registered

    return tuple(s for s in registered() if not (no_ocr and s.name == NAME))


def _check_folders(folders: List[Path], home, db) -> None:
    """Fail before any work on a path that is not a folder, unless files were indexed there (offline)."""
    absent = [f for f in folders if not f.is_dir()]
    if not absent:
        return
    from loupe.indexer.storage.catalog import path_key_of
    from loupe.indexer.storage.locations import resolve_location

    url = resolve_location(home, db).url
    exists = not url.startswith("sqlite:///") or Path(url[len("sqlite:///") :].split("?", 1)[0]).exists()
    store = open_store(home, db) if exists else None  # no catalog yet: do not create one for a typo
    for folder in absent:
        if store is None or not store.catalog.has_images(path_key_of(folder)):
            raise fail(f"not a folder: {folder}")


OFFLINE_WHY = {"missing": "the folder is gone", "empty": "no photos found", "unreadable": "the folder cannot be read"}


def _print_index_report(r) -> None:
    if r.offline:  # one line on stderr: a cron job's run still succeeds
        typer.echo(
            f"loupe: {r.root} is offline ({OFFLINE_WHY.get(r.offline, r.offline)}; an unplugged drive?): nothing was removed, "
            f"its files are kept, hidden from results until it is back (`loupe remove {r.root}` forgets them)",
            err=True,
        )
        return
    embedding = r.seconds - r.deferred_seconds  # the deferred pass (OCR) runs after the embeddings
    rate = f" ({r.embedded / embedding:.1f} img/s, {r.precision})" if r.embedded and embedding > 0 else ""
    typer.echo(
        f"{r.root}: {r.files} images seen; {r.embedded} embedded{rate}, {r.reused} reused (same content), "
        f"{r.touched} touched, {r.unchanged} unchanged, {r.removed} removed, {len(r.bad_files)} newly skipped "
        f"in {r.seconds:.2f}s"
    )
    if r.moments:
        typer.echo(f"videos: {r.moments} moments embedded")
    if r.bad_files:
        typer.echo(f"skipped {len(r.bad_files)} bad files:")
        for path, reason in r.bad_files[:20]:
            typer.echo(f"  {path}: {reason}")
        if len(r.bad_files) > 20:
            typer.echo(f"  ... and {len(r.bad_files) - 20} more (see `loupe info --skipped`)")
    for name, counts in r.signals.items():
        failed = f", failed on {counts['failed']}" if counts["failed"] else ""
        after = f" (after the embeddings, {r.deferred_seconds:.1f}s)" if name in r.deferred and r.deferred_seconds else ""
        typer.echo(f"signal {name}: computed for {counts['done']} photos{failed}{after}")
    for path, name, reason in r.signal_errors[:20]:
        typer.echo(f"  {path}: {name}: {reason}")
    for name, why in r.unavailable.items():
        typer.echo(f"signal {name}: skipped ({why})", err=True)
    for name, left in r.deferred.items():
        if left:
            typer.echo(f"signal {name}: {left} photos left (interrupted): the next `loupe index` continues")
    if r.walk_errors:
        typer.echo(f"warning: {r.walk_errors} folders or files could not be read")
    if r.restored:
        typer.echo(f"{r.restored} missing files found again (nothing re-embedded)")
    if r.missing:
        typer.echo(f"{r.missing} files not found: kept as missing, hidden from results (`--prune` forgets them)")


@app.command("index-text")
def index_text(
    file: Annotated[Path, typer.Argument(help="Captions: .txt (one per line), .jsonl, .csv/.tsv, or captions.json.")],
    column: Annotated[Optional[str], typer.Option("--column", help="Text field/column name for JSONL/CSV.")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 256,
    home: HomeOpt = None,
    db: DbOpt = None,
    no_wait: NoWaitOpt = False,
) -> None:
    """Add a caption corpus to the index, so an image can find the sentences that describe it."""
    from loupe.indexer.pipeline.captions import index_captions
    from loupe.indexer.pipeline.sources import read_captions

    read_captions(file, column)  # fail on a bad file before loading the model
    store = open_store(home, db)
    with writing(store, no_wait):
        encoder = _encoder_for(store, model, pretrained, checkpoint, device)
        r = index_captions(store, encoder, file, column=column, batch_size=batch_size, progress=_show_progress())
    typer.echo(f"{r.source}: {r.captions} captions; {r.embedded} embedded, {r.reused} reused in {r.seconds:.2f}s")


@app.command()
@grouped
def search(
    query: Annotated[List[str], typer.Argument(help='Sentence, image path, or a weighted mix: \'"2:beach" + ./dog.jpg - "people"\' (grammar above).')],
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="Number of results.")] = 10,
    captions: Annotated[bool, typer.Option("--captions", help="Search the caption corpus instead of the images.")] = False,
    min_score: Annotated[Optional[float], typer.Option("--min-score", help="Drop results below this cosine similarity.")] = None,
    folder: Annotated[Optional[Path], typer.Option("--in", help="Only images under this folder.")] = None,
    glob: Annotated[Optional[List[str]], typer.Option("--glob", help="Only paths (or file names) matching this glob; repeatable.")] = None,
    after: Annotated[Optional[str], typer.Option("--after", help="Only images taken/modified on or after: YYYY[-MM[-DD]].")] = None,
    before: Annotated[Optional[str], typer.Option("--before", help="Only images taken/modified before: YYYY[-MM[-DD]].")] = None,
    date_field: Annotated[str, typer.Option("--date-field", help="auto (capture time, else modified), taken, or modified.")] = "auto",
    as_json: JsonOpt = False,
    model: ModelOptions = ModelOptions(),
    text_precision: TextPrecisionOpt = "auto",
    approx: AnnOptions = AnnOptions(),
    at: LocationOptions = LocationOptions(),
    timings: Annotated[bool, typer.Option("--timings", help="Print how the query was answered on stderr, as one JSON line (seconds, text encoder, query-cache hits).")] = False,
) -> None:
    """Search the index by sentence, by image, or both (text->image, image->image, image->text).

    Words are text; "quoted" text is always text, whatever it contains.

    An image is a term that clearly is a path: it starts with / ./ ../ ~/
    or ends in an image extension (.jpg .png ...); img:PATH forces one
    (img:"my photo" for a name with spaces). A word that names a file in
    the current folder stays text; a missing image file is an error.

    W: starts a weighted term: 2:beach, 0.5:./dog.jpg, 2:"a beach", "2:a beach".
    A number after the colon is text: 10:30 sunset, 4:3 photo.

    + and - standing alone add and subtract terms, but only when the query
    has a quoted, weighted or image term: 'a dog - "a cat"'. Otherwise they
    are words of one sentence: a dog - not a cat, t - shirt, salt + pepper.
    """
    from loupe.cli.search_entry import run_search

    run_search(
        query, k, captions, min_score, folder, glob, after, before, date_field, as_json, **vars(model),
        text_precision=text_precision, **vars(approx), **vars(at), timings=timings, echo=typer.echo,
    )


@app.command()
@grouped
def info(
    skipped: Annotated[bool, typer.Option("--skipped", help="List every skipped file with its reason.")] = False,
    as_json: JsonOpt = False,
    at: LocationOptions = LocationOptions(),
) -> None:
    """Show what the index holds: counts, skipped files and why, model, sizes, last update."""
    from loupe.retrieval.engine.status import index_status, skipped_files

    store = open_store(at.home, at.db, writer=False)
    out = index_status(store)  # the same facts the web page's status view shows
    out["image_precision"] = store.image_precisions()
    from loupe.indexer.signals.base import versions
    from loupe.indexer.signals.registry import registered

    out["signals"] = store.catalog.signal_coverage(versions(registered()))
    out["photos_with_text"] = store.catalog.photos_with_text()
    if skipped:
        out["skipped_files"] = skipped_files(store)
    if as_json:
        typer.echo(json.dumps(out, default=str))
        return
    meta, stats, files = store.require_meta(), out, out["vector_files"]
    weights = meta.checkpoint_path or meta.pretrained or "random"
    typer.echo(f"catalog      {out['catalog']}")
    typer.echo(f"model        {meta.model} ({weights}), {meta.dim}-d, weights {meta.weights_id[:23]}")
    from loupe.indexer.models.precision import describe_backends, describe_record

    typer.echo(f"precision    image vectors {describe_record(out['image_precision'])}")
    typer.echo(f"backend      images: {describe_backends(out['image_precision'])}")
    for name, c in out["signals"].items():
        failed = f", failed on {c['failed']}" if c["failed"] else ""
        typer.echo(f"signal       {name} v{c['version']}: {c['done']} of {c['photos']} photos{failed}")
    ocr = out["signals"].get("text")
    if ocr is not None:
        left = ocr["photos"] - ocr["done"] - ocr["failed"]
        todo = f"; {left} not read yet (`loupe index` continues)" if left else ""
        typer.echo(f"text         {out['photos_with_text']} photos with text, {ocr['done']} of {ocr['photos']} read{todo}")
    missing = f", {stats['images_missing']} missing (hidden)" if stats["images_missing"] else ""
    typer.echo(f"images       {stats['images_indexed']} indexed ({stats['image_vectors']} distinct), "
               f"{stats['images_skipped']} skipped{missing}, {stats['indexed_bytes'] / 1e6:.1f} MB of photos")
    for root in out["roots"]:
        if root["offline"]:
            since = f" since {root['offline_since']} UTC" if root["offline_since"] else ""
            typer.echo(f"offline      {root['path']}: {OFFLINE_WHY.get(root['offline'], root['offline'])}{since} "
                       f"({root['missing']} files kept, hidden from results)")
        else:
            typer.echo(f"folder       {root['path']}: {root['files']} images at the last scan ({root['scanned_at']} UTC)"
                       + (f", {root['missing']} missing" if root["missing"] else ""))
    if stats.get("videos"):
        hours = stats["video_hours"]
        length = f"{hours:.1f} hours" if hours >= 1 else f"{hours * 60:.1f} minutes"
        typer.echo(f"videos       {stats['videos']} indexed, {stats['moments']} moments, {length}")
    typer.echo(f"captions     {stats['captions']} ({stats['text_vectors']} distinct) from {len(stats['caption_sources'])} files")
    for path, size in files.items():
        typer.echo(f"vector file  {path} ({size / 1e6:.1f} MB)")
    for kind, od in out["ondisk"].items():
        state = "in use" if od["state"] == "current" else f"stale, not used: it {od['why']}"
        typer.echo(f"on-disk      {kind}s: {od['path']} ({od['factory']}, {od['vectors']} vectors, {od['bytes'] / 1e6:.1f} MB; {state})")
    typer.echo(f"created      {out['created']} UTC, updated {out['updated']} UTC")
    for reason, n in stats["skip_reasons"]:
        typer.echo(f"skipped      {n:>6}  {reason}")
    for row in out.get("skipped_files", []):
        typer.echo(f"  {row['path']}: {row['reason']}")


@app.command()
@grouped
def check(
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild the vector files from the catalog if they disagree.")] = False,
    at: LocationOptions = LocationOptions(),
    no_wait: NoWaitOpt = False,
) -> None:
    """Verify that the catalog and the vector index agree (exit 1 if not)."""
    from loupe.indexer.storage.check import check_store

    store = open_store(at.home, at.db, writer=repair)
    report = check_store(store)
    for note in report.notes:
        typer.echo(f"note: {note}")
    if report.ok:
        typer.echo("ok: catalog and vector index agree")
        return
    for problem in report.problems:
        typer.echo(f"problem: {problem}")
    if repair:
        with writing(store, no_wait):
            for kind, r in store.sync_all(load=True).items():  # read every file: a label is checked against its content
                typer.echo(f"repaired {kind} index: +{r.added} -{r.removed}{' (rebuilt)' if r.rebuilt else ''}")
            repaired = check_store(store).ok
        if repaired:
            typer.echo("ok: catalog and vector index agree")
            return
    raise typer.Exit(1)


@app.command()
def remove(
    paths: Annotated[List[Path], typer.Argument(help="Files, folders or caption files to forget (nothing is deleted on disk).")],
    home: HomeOpt = None,
    db: DbOpt = None,
    no_wait: NoWaitOpt = False,
) -> None:
    """Remove files, folders or caption corpora from the index."""
    from loupe.indexer.pipeline.removal import remove_items

    store = open_store(home, db)
    with writing(store, no_wait):
        r = remove_items(store, list(paths))
    typer.echo(f"removed {r.images} images and {r.captions} captions")


@app.command()
def models() -> None:
    """List open_clip model names and their pretrained tags (loupe's own configs included)."""
    import open_clip

    from loupe.indexer.models.spec import register_model_configs

    register_model_configs()
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    for name in open_clip.list_models():
        typer.echo(f"{name:40s} {', '.join(tags.get(name, [])) or '(no pretrained tags: use --checkpoint or loupe train)'}")
