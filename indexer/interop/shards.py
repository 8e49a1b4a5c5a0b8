"""Embedding shards in clip-retrieval's layout: the files other tools read and write.

clip-retrieval's `clip-inference` writes, per output partition N (zero-padded to the width of the
partition count):

    DIR/img_emb/img_emb_N.npy          float16 (its default) or float32, shape (rows, dim), unit norm
    DIR/text_emb/text_emb_N.npy        the caption of each row, same row order
    DIR/metadata/metadata_N.parquet    one row per embedding row: `image_path`, `caption`, then any
                                       extra columns (`url`, `width`, ... from its input)

Row i of an npy shard is row i of its metadata shard; autofaiss, embedding-reader (which pairs
the sorted npy and parquet lists) and clip-retrieval's back end rely on it. This module reads
and writes exactly that, streaming (a shard is written piece by piece with its final shape in
the npy header, so no shard is ever held in memory), plus a small JSON manifest naming the model
that made the vectors (`MANIFEST`), which clip-retrieval does not write. It knows nothing of
the catalog (see `loupe.indexer.interop.transfer`).

pyarrow is an optional extra (`pip install 'loupe[shards]'`), imported only when needed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from loupe.indexer.errors import LoupeError

IMG, TXT = "img", "text"  # the two embedding folders: img_emb/, text_emb/
MANIFEST = "loupe_manifest.json"
FORMAT = "loupe-shards"
FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
DEFAULT_SHARD_SIZE = 1_000_000  # clip-retrieval's default write batch size

_SHARD = re.compile(r"^(img_emb|text_emb|metadata)_(\d+)\.(npy|parquet)$")


def require_pyarrow():
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise LoupeError("embedding shards need pyarrow: pip install 'loupe[shards]'") from None
    return pq


def emb_dir(root: Path, kind: str) -> Path:
    return Path(root) / f"{kind}_emb"


def shard_name(kind: str, number: int, width: int) -> str:
    """`img_emb_003.npy`, `text_emb_003.npy` or `metadata_003.parquet` (clip-retrieval's names)."""
    n = str(number).zfill(width)
    return f"metadata_{n}.parquet" if kind == "metadata" else f"{kind}_emb_{n}.npy"


def pad_width(shards: int) -> int:
    """Digits of a shard number: clip-retrieval pads to int(log10(partition count)) + 1."""
    return int(math.log10(max(shards, 1))) + 1


# ---- manifest ------------------------------------------------------------------------------
def write_manifest(root: Path, manifest: dict) -> None:
    """Write the manifest atomically (last, so a folder with one holds every shard it lists)."""
    path = Path(root) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **manifest}, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict | None:
    """The manifest of a folder of shards, or None (clip-retrieval's own output has none)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoupeError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LoupeError(f"{path}: not a loupe shard manifest")
    if int(data.get("version", 0)) > FORMAT_VERSION:
        raise LoupeError(f"{path}: manifest version {data.get('version')} is newer than this loupe reads ({FORMAT_VERSION})")
    return data


# ---- writing ---------------------------------------------------------------------------------
def _npy_header(path: Path, rows: int, dim: int, dtype: np.dtype):
    """Open `path` for writing and put an npy header for (rows, dim) of `dtype`: rows follow as raw bytes."""
    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (rows, dim)}
    )
    return f


class ShardWriter:
    """Streams rows into one clip-retrieval layout folder.

    `total` rows are announced up front, so shard sizes (and the zero-padded names) are known
    before the first byte and each npy header carries its final shape. `add` takes any number
    of rows: embeddings per kind (IMG and/or TXT, same row count) and metadata columns. A shard
    is written under temporary names and renamed when complete.
    """

    def __init__(
        self, root: Path, total: int, dim: int, kinds: Sequence[str] = (IMG,), dtype: str = "float16",
        shard_size: int = DEFAULT_SHARD_SIZE,
    ) -> None:
        if dtype not in DTYPES:
            raise LoupeError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if shard_size < 1:
            raise LoupeError("shard size must be at least 1")
        self.pq = require_pyarrow()
        self.root, self.total, self.dim, self.kinds = Path(root), total, dim, tuple(kinds)
        self.dtype = np.dtype(DTYPES[dtype])
        self.shard_size = shard_size
        self.shards = max(1, math.ceil(total / shard_size)) if total else 0
        self.width = pad_width(self.shards)
        for kind in self.kinds:
            emb_dir(self.root, kind).mkdir(parents=True, exist_ok=True)
        (self.root / "metadata").mkdir(parents=True, exist_ok=True)
        self.written = 0
        self.counts: list[int] = []
        self._open: dict | None = None

    def _start_shard(self) -> None:
        number = len(self.counts)
        rows = min(self.shard_size, self.total - self.written)
        files = {}
        for kind in self.kinds:
            final = emb_dir(self.root, kind) / shard_name(kind, number, self.width)
            files[kind] = (final, _npy_header(final.with_suffix(".npy.tmp"), rows, self.dim, self.dtype))
        meta = self.root / "metadata" / shard_name("metadata", number, self.width)
        self._open = {"rows": rows, "left": rows, "files": files, "meta": meta, "writer": None, "number": number}

    def add(self, embeddings: dict[str, np.ndarray], columns: dict[str, list]) -> None:
        """Append rows: `embeddings[kind]` of shape (n, dim) for each kind, and n values per column."""
        n = len(next(iter(embeddings.values())))
        if any(len(e) != n for e in embeddings.values()) or any(len(v) != n for v in columns.values()):
            raise ValueError("every embedding array and metadata column must have the same row count")
        if self.written + n > self.total:
            raise ValueError(f"more rows than the {self.total} announced")
        done = 0
        while done < n:
            if self._open is None:
                self._start_shard()
            shard = self._open
            take = min(shard["left"], n - done)
            for kind in self.kinds:
                vecs = np.asarray(embeddings[kind][done : done + take])
                if vecs.ndim != 2 or vecs.shape[1] != self.dim:
                    raise ValueError(f"{kind} embeddings must have shape (n, {self.dim})")
                shard["files"][kind][1].write(np.ascontiguousarray(vecs, dtype=self.dtype).tobytes())
            table = self._table({k: v[done : done + take] for k, v in columns.items()})
            if shard["writer"] is None:
                shard["writer"] = self.pq.ParquetWriter(str(shard["meta"]) + ".tmp", table.schema)
            shard["writer"].write_table(table)
            shard["left"] -= take
            done += take
            self.written += take
            if shard["left"] == 0:
                self._finish_shard()

    def _table(self, columns: dict[str, list]):
        import pyarrow as pa

        return pa.table({k: pa.array(list(v) if not isinstance(v, np.ndarray) else v) for k, v in columns.items()})

    def _finish_shard(self) -> None:
        shard, self._open = self._open, None
        for final, f in shard["files"].values():
            f.close()
            os.replace(final.with_suffix(".npy.tmp"), final)
        shard["writer"].close()
        os.replace(str(shard["meta"]) + ".tmp", shard["meta"])
        self.counts.append(shard["rows"])

    def close(self) -> list[int]:
        """Check every announced row came; returns the row count of each shard."""
        if self.written != self.total:
            raise LoupeError(f"{self.root}: {self.written} rows written, {self.total} announced (the catalog changed meanwhile?)")
        return self.counts


# ---- reading ---------------------------------------------------------------------------------
@dataclass
class Shard:
    """Shard N of a layout: its metadata file and the embedding files present for it."""

    number: int
    metadata: Path
    embeddings: dict[str, Path] = field(default_factory=dict)  # kind -> npy path
    rows: int = 0
    dim: int = 0
    dtype: str = ""


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    out: dict[int, Path] = {}
    if not folder.is_dir():
        return out
    for p in folder.iterdir():
        m = _SHARD.match(p.name)
        if m and m.group(1) == prefix and m.group(3) == suffix:
            n = int(m.group(2))
            if n in out:
                raise LoupeError(f"{folder}: two files for shard {n} ({out[n].name}, {p.name})")
            out[n] = p
    return out


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of an npy file, from its header alone."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, OSError) as exc:
            raise LoupeError(f"{path}: not a numpy file ({exc})") from None
        offset = f.tell()
    if fortran:
        raise LoupeError(f"{path}: Fortran-ordered arrays are not supported")
    return shape, dtype, offset


def list_shards(root: Path) -> list[Shard]:
    """The shards of one layout folder, by number; their files checked to agree.

    Embedding and metadata files are matched by shard number (not by sorted position), every
    npy must be 2-D float16/float32 of one dimension, and a metadata file must have exactly as
    many rows as its embedding files. A folder without `metadata/` or embeddings gives [].
    """
    root = Path(root)
    metas = _numbered(root / "metadata", "metadata", "parquet")
    embs = {kind: _numbered(emb_dir(root, kind), f"{kind}_emb", "npy") for kind in (IMG, TXT)}
    if not metas and not any(embs.values()):
        return []
    pq = require_pyarrow()
    shards = []
    dims: set[int] = set()
    for kind, files in embs.items():
        for n in files:
            if n not in metas:
                raise LoupeError(f"{files[n]} has no metadata file metadata/metadata_{n}.parquet")
    for n in sorted(metas):
        shard = Shard(n, metas[n])
        try:
            shard.rows = pq.ParquetFile(metas[n]).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise LoupeError(f"{metas[n]}: unreadable parquet ({exc})") from None
        for kind, files in embs.items():
            if n not in files:
                continue
            shape, dtype, _ = npy_header(files[n])
            if len(shape) != 2 or dtype not in (np.float16, np.float32):
                raise LoupeError(f"{files[n]}: expected a 2-D float16/float32 array, found {dtype} {shape}")
            if shape[0] != shard.rows:
                raise LoupeError(f"{files[n]} has {shape[0]} rows but {metas[n].name} has {shard.rows}")
            shard.embeddings[kind] = files[n]
            shard.dim, shard.dtype = shape[1], str(dtype)
            dims.add(shape[1])
        if not shard.embeddings and shard.rows:
            raise LoupeError(f"{metas[n]} has no embedding file (img_emb/ or text_emb/) for shard {n}")
        shards.append(shard)
    if len(dims) > 1:
        raise LoupeError(f"{root}: shards of different dimensions {sorted(dims)}")
    return shards


def open_embeddings(path: Path) -> np.ndarray:
    """An npy shard memory-mapped read-only: rows are read from disk only when touched."""
    return np.load(path, mmap_mode="r")


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an npy shard as float32, read with one plain read (no mapping).

    For streaming a whole collection: pages read this way are not mapped into the process, so
    they do not count towards its resident memory (a mapped scan of 20 GB would).
    """
    shape, dtype, offset = npy_header(path)
    dim = shape[1]
    start, stop = max(0, start), min(stop, shape[0])
    with open(path, "rb") as f:
        f.seek(offset + start * dim * dtype.itemsize)
        data = np.fromfile(f, dtype=dtype, count=max(0, stop - start) * dim)
    return data.reshape(-1, dim).astype(np.float32, copy=False)


def read_metadata(shard: Shard, columns: Sequence[str] | None = None):
    """The metadata of a shard as a pyarrow Table (only `columns` that exist, if given)."""
    pq = require_pyarrow()
    names = pq.ParquetFile(shard.metadata).schema_arrow.names
    wanted = [c for c in columns if c in names] if columns is not None else None
    return pq.read_table(shard.metadata, columns=wanted)


def iter_batches(shard: Shard, kind: str, batch: int = 50_000) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 rows) of one embedding file of `shard`, `batch` rows at a time."""
    path = shard.embeddings[kind]
    for start in range(0, shard.rows, batch):
        yield start, read_rows(path, start, start + batch)
