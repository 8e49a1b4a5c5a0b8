"""export, import, build-index: embedding shards in clip-retrieval's layout (option parsing only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from loupe.cli.app import app, open_store, writing
from loupe.cli.options import CheckpointOpt, JsonOpt, LocationOptions, ModelOpt, NoWaitOpt, PretrainedOpt, grouped


@app.command("export")
@grouped
def export_(
    folder: Annotated[Path, typer.Argument(help="New or empty folder for img_emb/, metadata/, captions/ and the manifest.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 (exact) or float16 (clip-retrieval's default, half the size).")] = "float32",
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Rows per npy/parquet shard.")] = 1_000_000,
    at: LocationOptions = LocationOptions(),
    as_json: JsonOpt = False,
    no_wait: NoWaitOpt = False,
) -> None:
    """Write the index's vectors and metadata as clip-retrieval embedding shards.

    Photos go to img_emb/img_emb_N.npy with metadata/metadata_N.parquet (image_path, the catalog
    key hash/vector_id, size, mtime_ns, width, height, taken_at); the caption corpus to
    captions/text_emb/ and captions/metadata/ (caption, image, source, position, hash,
    vector_id); video moments to moments/img_emb/ and moments/metadata/ (video_path, hash,
    moment, start, time, end, vector_id); loupe_manifest.json names the model. autofaiss, embedding-reader and
    clip-retrieval read it as is; `loupe import` reads it back.
    """
    from loupe.indexer.interop.shards import require_pyarrow
    from loupe.indexer.interop.transfer import describe_export, export_catalog

    require_pyarrow()
    store = open_store(at.home, at.db, writer=False)
    store.require_meta()
    with writing(store, no_wait):
        report = export_catalog(store, folder, dtype=dtype, shard_size=shard_size)
    typer.echo(json.dumps(vars(report)) if as_json else describe_export(report))


@app.command("import")
@grouped
def import_(
    folder: Annotated[Path, typer.Argument(help="A folder of embedding shards written by `loupe export` or clip-retrieval.")],
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    path_column: Annotated[Optional[str], typer.Option("--path-column", help="Metadata column that keys photos (default image_path, else url).")] = None,
    at: LocationOptions = LocationOptions(),
    as_json: JsonOpt = False,
    no_wait: NoWaitOpt = False,
) -> None:
    """Add embedding shards (clip-retrieval's layout) to the index: photos by path, captions as a corpus.

    The shards' model must be the index's: a loupe export names it in its manifest; for
    clip-retrieval's output (no manifest) say which weights made the vectors with --model and
    --pretrained, or --checkpoint. Re-importing adds nothing; the vector files are synced at the end.
    """
    from loupe.indexer.interop.shards import require_pyarrow
    from loupe.indexer.interop.transfer import describe_import, import_shards

    require_pyarrow()
    store = open_store(at.home, at.db)
    with writing(store, no_wait):
        report = import_shards(store, folder, model=model, pretrained=pretrained, checkpoint=checkpoint, path_column=path_column)
    typer.echo(json.dumps(vars(report)) if as_json else describe_import(report))


@app.command("build-index")
@grouped
def build_index(
    shards: Annotated[Optional[Path], typer.Argument(help="A folder of embedding shards (img_emb/img_emb_N.npy ..., e.g. from `loupe export`); none: the index's own vectors.")] = None,
    out: Annotated[Optional[Path], typer.Argument(help="Folder for the index built from SHARDS (index.faiss + lists.ivfdata + ondisk.json).")] = None,
    factory: Annotated[Optional[str], typer.Option("--index-factory", help="FAISS IVF factory string (default: IVF<~sqrt n>,PQ<dim/4>np; IVF<n/40>,SQ8 below 10,240 vectors).")] = None,
    texts: Annotated[bool, typer.Option("--texts", help="Index the captions (text_emb/) instead of the photos (img_emb/).")] = False,
    at: LocationOptions = LocationOptions(),
    as_json: JsonOpt = False,
    no_wait: NoWaitOpt = False,
) -> None:
    """Build an IVF index larger than memory: lists on disk, memory-mapped for search.

    Without arguments it indexes the index's own vectors (--home/--db) into a folder beside its
    FAISS file, and `loupe search` and `loupe serve` use it from then on, for as long as it is
    current (after `loupe index` adds or removes photos they say it is stale and use the FAISS
    file until it is rebuilt). With SHARDS and OUT it indexes npy shards into OUT.

    Trains on a sample, adds block by block (memory bounded by one block's codes), merges the
    lists into one on-disk file; an interrupted build resumes with the blocks already added.
    Searches re-rank their candidates exactly against the float vectors (the catalog's, or the shards').
    """
    from loupe.indexer.errors import LoupeError
    from loupe.indexer.storage.ondisk.build import build_catalog_ondisk, build_ondisk, report_dict
    from loupe.indexer.interop.shards import IMG, TXT

    def say(message: str) -> None:
        typer.echo(message, err=True)

    if shards is None:
        store = open_store(at.home, at.db, writer=False)
        store.require_meta()
        with writing(store, no_wait):  # the catalog holds still while its vectors are read
            report = build_catalog_ondisk(store, "text" if texts else "image", factory=factory, progress=say)
    elif out is None:
        raise LoupeError("build-index SHARDS needs OUT, the folder for the index (or no argument: the index's own vectors)")
    else:
        report = build_ondisk(shards, out, factory=factory, kind=TXT if texts else IMG, progress=say)
    if as_json:
        typer.echo(json.dumps(report_dict(report)))
    else:
        typer.echo(
            f"{report.out}: {report.rows} vectors from {report.shards} {'blocks' if shards is None else 'shards'}, {report.factory}, "
            f"{report.disk_bytes / 1e6:.1f} MB on disk in {report.seconds['total']:.1f}s"
        )
