"""Catalog <-> embedding shards: `loupe export` and `loupe import`.

Export writes the catalog's visible photos (one row per file, in path order) as a
clip-retrieval layout in DIR (img_emb/ + metadata/ with `image_path` and the catalog key), the
caption corpus as a second, text-only layout in DIR/captions/ (text_emb/ + metadata/ with
`caption`: a caption is not paired with one image row, so it cannot share the photos'
metadata), and a manifest naming the model. It holds the writer lock, so the files are one state.

Import reads such a folder, written by loupe or by clip-retrieval, into a catalog: photos keyed
by path, captions as a caption corpus (one per loupe source, else one per shard). The model
binding is checked before anything is written: shards of another model are refused, and shards
without a manifest (clip-retrieval's) need the model named explicitly. Import is incremental and
idempotent: rows already in the catalog with the same content are left alone, so a second import
adds nothing and does not even bump the catalog generation. It holds the writer lock like every
writer and brings the FAISS files in line at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from loupe.indexer.interop import shards as sh
from loupe.indexer.storage.catalog import OK, TEXT, ImageRecord, Meta
from loupe.indexer.storage.critical import critical_section
from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locking import holds_writer_lock
from loupe.indexer.storage.store import Store

CAPTIONS_DIR = "captions"
IMAGE_COLUMNS = ("image_path", "hash", "vector_id", "size", "mtime_ns", "width", "height", "taken_at")
CAPTION_COLUMNS = ("caption", "image", "source", "position", "hash", "vector_id")
MOMENT_COLUMNS = ("video_path", "hash", "moment", "start", "time", "end", "vector_id")  # a video moment's times in seconds
MOMENTS_DIR = "moments"  # video moments: a layout folder of their own (the export's image rows are files)
READ_CHUNK = 20_000  # rows per catalog transaction on import, per query page on export
FOREIGN_PREFIX = "vec:"  # content key of a row whose file was never hashed (a clip-retrieval shard)


# ---- model binding -------------------------------------------------------------------------
@dataclass(frozen=True)
class Binding:
    """Which weights made a set of vectors: what the catalog's meta row and the manifest record."""

    model: str
    pretrained: str | None
    weights_id: str  # the pretrained tag, or 'sha256:<hex>' of the checkpoint file
    dim: int
    checkpoint_path: str | None = None  # a local file holding those weights, if known

    def describe(self) -> str:
        if self.weights_id.startswith("sha256:"):
            return f"{self.model} (checkpoint sha256 {self.weights_id[7:19]}...)"
        return f"{self.model}/{self.weights_id}"


def binding_of_meta(meta: Meta) -> Binding:
    return Binding(meta.model, meta.pretrained, meta.weights_id, meta.dim, meta.checkpoint_path)


def binding_of_manifest(manifest: dict, where: Path) -> Binding:
    try:
        return Binding(
            str(manifest["model"]), manifest.get("pretrained"), str(manifest["weights_id"]), int(manifest["dim"]),
            manifest.get("checkpoint_path"),
        )
    except (KeyError, TypeError, ValueError):
        raise LoupeError(f"{where / sh.MANIFEST}: manifest lacks the model binding (model, weights_id, dim)") from None


def binding_of_options(model: str | None, pretrained: str | None, checkpoint: str | os.PathLike | None, dim: int) -> Binding | None:
    """The binding named by --model/--pretrained/--checkpoint (None if none given); loads no weights.

    The options resolve as every command's do (`loupe.indexer.models.spec.resolve_spec`), without
    checking a tag against open_clip's list: the shards' manifest speaks for their model."""
    from loupe.indexer.models.spec import resolve_spec

    if not (model or pretrained or checkpoint):
        return None
    spec = resolve_spec(model, pretrained, checkpoint, check_tags=False)
    return Binding(spec.model, spec.pretrained, spec.weights_id, dim, spec.checkpoint)


def _same(a: Binding, b: Binding) -> bool:
    return (a.model, a.weights_id, a.dim) == (b.model, b.weights_id, b.dim)


def _local_checkpoint(binding: Binding) -> str | None:
    """The checkpoint file the binding names, if it exists here with the recorded sha256."""
    from loupe.indexer.models.spec import file_sha256

    path = binding.checkpoint_path
    if not path or not binding.weights_id.startswith("sha256:") or not os.path.isfile(path):
        return None
    return path if f"sha256:{file_sha256(path)}" == binding.weights_id else None


def resolve_binding(store: Store, folder: Path, manifest: dict | None, given: Binding | None, dim: int) -> Binding:
    """The binding to import under, checked against the shards, the options and the catalog."""
    if manifest is not None:
        binding = binding_of_manifest(manifest, folder)
        if given is not None and not _same(given, binding):
            raise LoupeError(f"{folder} holds vectors of {binding.describe()}, not {given.describe()}")
        if given is not None and given.checkpoint_path:
            binding = Binding(binding.model, binding.pretrained, binding.weights_id, binding.dim, given.checkpoint_path)
        else:
            binding = Binding(binding.model, binding.pretrained, binding.weights_id, binding.dim, _local_checkpoint(binding))
    elif given is None:
        raise LoupeError(
            f"{folder} has no {sh.MANIFEST} naming the model that made its vectors: "
            "pass --model NAME with --pretrained TAG or --checkpoint FILE"
        )
    else:
        binding = given
    if dim and binding.dim != dim:
        raise LoupeError(f"{folder} holds {dim}-dimensional vectors, but {binding.describe()} makes {binding.dim}-dimensional ones")
    meta = store.meta()
    if meta is not None and not _same(binding_of_meta(meta), binding):
        raise LoupeError(
            f"{folder} holds vectors of {binding.describe()}, but this index was built with "
            f"{binding_of_meta(meta).describe()}: import into another --home/--db"
        )
    return binding


def _bind(store: Store, binding: Binding) -> Meta:
    meta = store.meta()
    if meta is not None:
        return meta
    from loupe.indexer.models.spec import ModelSpec, binding_record

    spec = ModelSpec(binding.model, binding.pretrained, binding.checkpoint_path)
    return store.catalog.create_meta(**binding_record(spec, binding.weights_id, binding.dim))


# ---- export --------------------------------------------------------------------------------
@dataclass
class ExportReport:
    folder: str  # the export, in clip-retrieval's layout
    images: int = 0  # rows written per kind: visible files (a copy of a photo is a row of its own)
    captions: int = 0
    moments: int = 0  # video moments
    image_shards: int = 0  # numbered .npy/.parquet pairs per kind
    caption_shards: int = 0
    moment_shards: int = 0
    dtype: str = "float32"  # of the vectors written (float16 halves the size)
    bytes: int = 0  # everything under the folder afterwards
    seconds: float = 0.0


def _has_layout(folder: Path) -> bool:
    return any((folder / d).exists() for d in ("img_emb", "text_emb", "metadata", sh.MANIFEST, CAPTIONS_DIR, MOMENTS_DIR))


@holds_writer_lock
def export_catalog(
    store: Store, folder: str | os.PathLike, dtype: str = "float32", shard_size: int = sh.DEFAULT_SHARD_SIZE
) -> ExportReport:
    """Write the catalog's photos and captions as clip-retrieval shards in `folder`, plus the manifest.

    float32 keeps the vectors exactly; float16 (clip-retrieval's choice) halves the size and
    rounds each component (~5e-4 relative). Refuses a folder that already holds shards. Holds
    the writer lock, so what it writes is one state of the catalog (searches go on meanwhile).
    """
    t0 = time.perf_counter()
    sh.require_pyarrow()
    if dtype not in sh.DTYPES:
        raise LoupeError(f"--dtype must be one of {', '.join(sh.DTYPES)}, not {dtype!r}")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise LoupeError(f"not a folder: {root}")
    if _has_layout(root):
        raise LoupeError(f"{root} already holds embedding shards: export into a new or empty folder")
    meta = store.require_meta()
    report = ExportReport(folder=str(root), dtype=dtype)
    catalog = store.catalog  # under the writer lock: counts and rows agree
    n_images, n_captions = catalog.count_export_images(), catalog.count_export_captions()
    root.mkdir(parents=True, exist_ok=True)
    if n_images:
        texts = catalog.texts_by_hash()  # text read in the photos (OCR), its lines joined by newlines
        rows = (row[:-1] + (texts.get(row[1], ""),) + row[-1:] for row in catalog.export_images())
        report.image_shards = _write(rows, root, sh.IMG, n_images, meta.dim, dtype, shard_size, IMAGE_COLUMNS + ("text",))
    if n_captions:
        report.caption_shards = _write(
            catalog.export_captions(), root / CAPTIONS_DIR, sh.TXT, n_captions, meta.dim, dtype, shard_size, CAPTION_COLUMNS
        )
    n_moments = catalog.count_export_moments()
    if n_moments:  # video moments: their vectors with the video's path and the moment's times
        report.moment_shards = _write(
            catalog.export_moments(), root / MOMENTS_DIR, sh.IMG, n_moments, meta.dim, dtype, shard_size, MOMENT_COLUMNS
        )
    report.images, report.captions, report.moments = n_images, n_captions, n_moments
    binding = binding_of_meta(meta)
    sh.write_manifest(root, {
        "model": binding.model,
        "pretrained": binding.pretrained,
        "weights_id": binding.weights_id,
        "checkpoint_sha256": binding.weights_id[7:] if binding.weights_id.startswith("sha256:") else None,
        "checkpoint_path": binding.checkpoint_path,
        "dim": binding.dim,
        "dtype": dtype,
        "shard_size": shard_size,
        "images": {"folder": ".", "rows": n_images, "shards": report.image_shards},
        "captions": {"folder": CAPTIONS_DIR, "rows": n_captions, "shards": report.caption_shards},
        "moments": {"folder": MOMENTS_DIR, "rows": n_moments, "shards": report.moment_shards, "columns": list(MOMENT_COLUMNS)},
        "exported_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    })
    report.bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    report.seconds = time.perf_counter() - t0
    return report


def _write(rows: Iterable[Sequence], root: Path, kind: str, total: int, dim: int, dtype: str, shard_size: int, names: tuple) -> int:
    """Stream `rows` (columns `names` then the vector blob) into one layout folder, `READ_CHUNK` at a time."""
    writer = sh.ShardWriter(root, total, dim, kinds=(kind,), dtype=dtype, shard_size=shard_size)
    rows = iter(rows)
    while part := list(itertools.islice(rows, READ_CHUNK)):
        cols = list(zip(*part))
        vecs = np.frombuffer(b"".join(cols[-1]), dtype=np.float32).reshape(len(part), dim)
        writer.add({kind: vecs}, {name: list(values) for name, values in zip(names, cols[:-1])})
    return len(writer.close())


# ---- import --------------------------------------------------------------------------------
@dataclass
class ImportReport:
    folder: str
    model: str = ""  # the model the vectors were made with (the index's, or given to a new index)
    images_seen: int = 0  # rows read
    images_added: int = 0  # paths new to the catalog
    images_updated: int = 0  # paths known with another content, size, time or vector
    images_unchanged: int = 0  # exactly as catalogued: not written again
    captions_seen: int = 0
    captions_added: int = 0
    captions_unchanged: int = 0
    skipped: int = 0  # rows without a usable path/caption or with a non-finite vector
    files_hashed: int = 0  # photos found at their path here, read and hashed as `loupe index` would
    vectors_added: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _unit_rows(vecs: np.ndarray, was_half: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows and which are usable (finite, non-zero). float16 rows are re-normalised:
    their rounding leaves norms ~1e-3 off, and loupe scores by inner product."""
    vecs = np.asarray(vecs, dtype=np.float32)
    norms = np.linalg.norm(vecs, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    if was_half:
        vecs = vecs / np.where(ok, norms, 1.0)[:, None]
    return vecs, ok


def _vector_key(vec: np.ndarray) -> str:
    """A content key for a row no file hash is known for: a digest of its float32 vector."""
    return FOREIGN_PREFIX + hashlib.blake2b(np.ascontiguousarray(vec, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


def _column(table, name: str, n: int) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * n


@holds_writer_lock
def import_shards(
    store: Store,
    folder: str | os.PathLike,
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    path_column: str | None = None,
) -> ImportReport:
    """Read a clip-retrieval layout (loupe's or clip-retrieval's) into the catalog, then sync FAISS.

    Photos come from img_emb/ (keyed by `image_path`, or `path_column`, e.g. `url`), captions
    from text_emb/ (`caption`), and a loupe export's captions/ sub-folder. A relative path is
    taken relative to the folder the shards were exported from, i.e. kept as written.
    """
    t0 = time.perf_counter()
    root = Path(folder)
    if not root.is_dir():
        raise LoupeError(f"not a folder: {root}")
    sh.require_pyarrow()
    manifest = sh.read_manifest(root)
    layouts = [(root, sh.list_shards(root))]
    if (root / CAPTIONS_DIR).is_dir():
        layouts.append((root / CAPTIONS_DIR, sh.list_shards(root / CAPTIONS_DIR)))
    all_shards = [s for _, found in layouts for s in found]
    if not all_shards:
        raise LoupeError(f"{root} holds no embedding shards (img_emb/, text_emb/ and metadata/)")
    dims = {s.dim for s in all_shards if s.dim}
    if len(dims) > 1:
        raise LoupeError(f"{root}: shards of different dimensions {sorted(dims)}")
    dim = dims.pop() if dims else 0
    if manifest is not None:
        for key, (sub, found) in zip(("images", "captions"), layouts + [(None, [])] * (2 - len(layouts))):
            want = (manifest.get(key) or {}).get("rows")
            kind = sh.IMG if key == "images" else sh.TXT
            have = sum(s.rows for s in found if kind in s.embeddings)
            if want is not None and int(want) != have:
                raise LoupeError(f"{root}: manifest lists {want} {key}, the shards hold {have} (incomplete copy?)")
    given = binding_of_options(model, pretrained, checkpoint, dim)
    binding = resolve_binding(store, root, manifest, given, dim)
    meta = _bind(store, binding)
    report = ImportReport(folder=str(root), model=binding.describe())
    before = store.catalog.count_stored_vectors()
    for sub, found in layouts:
        for shard in found:
            if sh.IMG in shard.embeddings:
                _import_images(store, shard, meta.dim, path_column, report)
        _import_captions(store, sub, [s for s in found if sh.TXT in s.embeddings], report)
    report.vectors_added = store.catalog.count_stored_vectors() - before
    store.sync_all()
    report.seconds = time.perf_counter() - t0
    return report


def _path_states(store: Store, keys: list[bytes]) -> dict[bytes, tuple]:
    """(content hash, size, mtime_ns, status, width, height, taken_at) of the rows at `keys`."""
    return {
        key: (r.content_hash, r.size, r.mtime_ns, r.status, r.width, r.height, r.taken_at)
        for key, r in store.catalog.image_rows_at(keys).items()
    }


def _import_images(store: Store, shard: sh.Shard, dim: int, path_column: str | None, report: ImportReport) -> None:
    table = sh.read_metadata(shard)
    column = path_column or ("image_path" if "image_path" in table.column_names else "url")
    if column not in table.column_names:
        raise LoupeError(f"{shard.metadata} has no {column!r} column to key photos by (try --path-column)")
    n = shard.rows
    paths = table.column(column).to_pylist()
    hashes = _column(table, "hash", n)
    sizes, mtimes = _column(table, "size", n), _column(table, "mtime_ns", n)
    widths, heights, takens = _column(table, "width", n), _column(table, "height", n), _column(table, "taken_at", n)
    was_half = shard.dtype == "float16"
    for start, raw in sh.iter_batches(shard, sh.IMG, READ_CHUNK):
        vecs, ok = _unit_rows(raw, was_half)
        stop = start + len(vecs)
        report.images_seen += len(vecs)
        records: list[ImageRecord] = []
        new_vectors: list[tuple[str, np.ndarray]] = []
        for i in range(start, stop):
            path = paths[i]
            if not ok[i - start] or not path or len(vecs[i - start]) != dim:
                report.skipped += 1
                continue
            h = hashes[i] or _vector_key(vecs[i - start])
            key = os.fsencode(path)
            records.append(ImageRecord(
                path_key=key, size=_int(sizes[i]) or 0, mtime_ns=_int(mtimes[i]) or 0, content_hash=h,
                width=_int(widths[i]), height=_int(heights[i]), taken_at=_naive(takens[i]),
            ))
            new_vectors.append((h, vecs[i - start]))
        states = _path_states(store, [r.path_key for r in records])
        for n, r in enumerate(records):
            local = _local_record(r, states.get(r.path_key), report)
            if local is not None:
                records[n], new_vectors[n] = local, (local.content_hash, new_vectors[n][1])
        fresh = []
        for r, v in zip(records, new_vectors):
            old = states.get(r.path_key)
            if old == (r.content_hash, r.size, r.mtime_ns, OK, r.width, r.height, r.taken_at):
                report.images_unchanged += 1
                continue
            if old is None:
                report.images_added += 1
            else:
                report.images_updated += 1
            fresh.append((r, v))
        if fresh:
            with critical_section():  # a Ctrl-C lands between transactions, never inside one
                store.catalog.write_images([r for r, _ in fresh], [v for _, v in fresh], {})


def _local_record(r: ImageRecord, old: tuple | None, report: ImportReport) -> ImageRecord | None:
    """The row `loupe index` would write for a photo whose file exists here, so that indexing its
    folder afterwards finds it unchanged and embeds nothing; None to keep the shard's row.

    The file's size and time come from stat; its content hash and (from the header) size in
    pixels and capture time are read only when neither the catalog (a re-import) nor the shard
    (a loupe export of this very file) already give them for this size and time. A file whose
    content differs from the hash the shard gives is another photo: the shard's row is kept, and
    `loupe index` embeds the file.
    """
    from loupe.indexer.pipeline.imageio import BadImage, probe_image
    from loupe.indexer.pipeline.stages import content_hash

    path = os.fsdecode(r.path_key)
    if not os.path.isabs(path):
        return None  # relative to wherever the shards were made: not a file of this machine
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    same = (st.st_size, st.st_mtime_ns)
    if old is not None and old[1:3] == same and old[0] and not old[0].startswith(FOREIGN_PREFIX):
        h, width, height, taken = old[0], old[4], old[5], old[6]
        if r.content_hash.startswith(FOREIGN_PREFIX) or r.content_hash == h:
            return ImageRecord(path_key=r.path_key, size=same[0], mtime_ns=same[1], content_hash=h, width=width, height=height, taken_at=taken)
    if not r.content_hash.startswith(FOREIGN_PREFIX) and (r.size, r.mtime_ns) == same:
        return None  # a loupe export of this very file: its row is already what indexing writes
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    report.files_hashed += 1
    h = content_hash(data)
    if not r.content_hash.startswith(FOREIGN_PREFIX) and r.content_hash != h:
        return None
    try:
        info = probe_image(data)
        width, height, taken = info.width, info.height, info.taken_at
    except (BadImage, OSError, ValueError):  # not an image PIL reads: the shard's values stay
        width, height, taken = r.width, r.height, r.taken_at
    return ImageRecord(path_key=r.path_key, size=same[0], mtime_ns=same[1], content_hash=h, width=width, height=height, taken_at=taken)


def _int(value) -> int | None:
    """A whole number from a metadata cell (pandas writes missing ints as NaN floats), else None."""
    try:
        return int(value) if value is not None and np.isfinite(value) else None
    except (TypeError, ValueError):
        return None


def _naive(value) -> datetime | None:
    if value is None:
        return None
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    return value.replace(tzinfo=None) if isinstance(value, datetime) else None


def _import_captions(store: Store, sub: Path, found: list[sh.Shard], report: ImportReport) -> None:
    """Each loupe source (column `source`) becomes that caption corpus again; rows of a foreign
    shard form one corpus named after its metadata file. A corpus already holding exactly these
    captions is left alone."""
    from loupe.indexer.pipeline.stages import content_hash

    groups: dict[str, list[tuple[int, str, str | None, str, np.ndarray]]] = {}
    for shard in found:
        table = sh.read_metadata(shard)
        if "caption" not in table.column_names:
            raise LoupeError(f"{shard.metadata} has no 'caption' column for its text embeddings")
        n = shard.rows
        texts = table.column("caption").to_pylist()
        sources, positions = _column(table, "source", n), _column(table, "position", n)
        images = _column(table, "image", n)
        if images == [None] * n and "image_path" in table.column_names:
            images = table.column("image_path").to_pylist()  # clip-retrieval's pairs: the caption's image
        own = str(shard.metadata.resolve())
        was_half = shard.dtype == "float16"
        for start, raw in sh.iter_batches(shard, sh.TXT, READ_CHUNK):
            vecs, ok = _unit_rows(raw, was_half)
            for j in range(len(vecs)):
                i = start + j
                text = texts[i]
                report.captions_seen += 1
                if not ok[j] or not isinstance(text, str) or not text.strip():
                    report.skipped += 1
                    continue
                source = sources[i] or own
                position = int(positions[i]) if positions[i] is not None else i
                groups.setdefault(source, []).append((position, text, images[i], content_hash(text.encode("utf-8")), vecs[j]))
    for source, rows in groups.items():
        have = store.catalog.caption_hashes(source)
        if set(have) == {(p, h) for p, _, _, h, _ in rows}:
            report.captions_unchanged += len(rows)
            continue
        report.captions_added += len(rows)
        known = store.catalog.hash_to_vector(TEXT)
        new_vectors = [(h, v) for _, _, _, h, v in rows if h not in known]
        with critical_section():
            store.catalog.replace_captions(source, [(p, t, img, h) for p, t, img, h, _ in rows], new_vectors, known)


def describe_import(report: ImportReport) -> str:
    """One line for the CLI."""
    return (
        f"{report.folder}: {report.images_seen} photos ({report.images_added} added, {report.images_updated} updated, "
        f"{report.images_unchanged} unchanged), {report.captions_seen} captions ({report.captions_added} added, "
        f"{report.captions_unchanged} unchanged), {report.skipped} skipped, {report.files_hashed} local files hashed, "
        f"{report.vectors_added} new vectors "
        f"of {report.model} in {report.seconds:.2f}s"
    )


def describe_export(report: ExportReport) -> str:
    return (
        f"{report.folder}: {report.images} photos in {report.image_shards} shards, {report.captions} captions in "
        f"{report.caption_shards} shards"
        + (f", {report.moments} video moments (with their times) in {MOMENTS_DIR}/" if report.moments else "")
        + f" ({report.dtype}, {report.bytes / 1e6:.1f} MB) in {report.seconds:.2f}s"
    )
