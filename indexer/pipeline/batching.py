"""Keep the model busy: decode and preprocess in worker threads while the model embeds batches.

Pillow and torch release the GIL while decoding, resizing and normalising, so threads give
real parallelism without the start-up cost and pickling of worker processes. The window of
in-flight jobs is bounded, so memory stays flat on a folder of any size.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from loupe.indexer.pipeline.imageio import BadImage, decode_image

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Decode threads: one per core (the model's own threads take the rest of the time)."""
    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int | None = None, window: int = 256
) -> Iterator[tuple[T, R | BaseException]]:
    """Apply `fn` to each item in threads, yielding (item, result or exception) in input order.

    Exceptions are returned, not raised, so one bad file never stops a batch.
    """
    workers = workers or default_workers()
    if workers <= 1:
        for item in items:
            try:
                yield item, fn(item)
            except Exception as exc:  # noqa: BLE001 - handed to the caller as a value
                yield item, exc
        return
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loupe-decode") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= window:
                    yield _resolve(pending.popleft())
            while pending:
                yield _resolve(pending.popleft())
        finally:
            for _, fut in pending:
                fut.cancel()


def _resolve(entry: tuple[T, Future]) -> tuple[T, object]:
    item, fut = entry
    try:
        return item, fut.result()
    except Exception as exc:  # noqa: BLE001
        return item, exc


def reason_for(exc: BaseException) -> str:
    """The skip reason stored for a file that failed to load."""
    if isinstance(exc, BadImage):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "file disappeared while indexing"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError):
        return f"read error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class EmbedResult:
    """Vectors for the files that decoded, plus which ones failed and why."""

    vectors: np.ndarray
    ok: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)


def embed_images(
    paths: Sequence[str | Path],
    encoder: "Encoder",
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "embedding",
    reference: bool = False,
) -> EmbedResult:
    """Embed image files in order; bad files are skipped and reported in `bad`, never raised.

    Composes the pipeline's read+decode and embed units (`loupe.indexer.pipeline.stages`), as indexing does.
    `reference`: decode as the reference pipeline does (`decode_image`'s reference mode, for eval).
    """
    from loupe.indexer.pipeline.stages import decode_paths, embed_stream

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True)
    chunks: list[np.ndarray] = []
    ok: list[int] = []
    bad: dict[int, str] = {}
    try:
        decoded = decode_paths(paths, encoder.image_size, encoder.preprocess, workers, window=4 * batch_size, reference=reference)
        for keys, vecs, failed in embed_stream(encoder, decoded, batch_size):
            chunks.append(vecs)
            ok.extend(keys)
            bad.update(failed)
            if bar is not None:
                bar.update(len(keys) + len(failed))
    finally:
        if bar is not None:
            bar.close()
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return EmbedResult(vectors=vectors, ok=ok, bad=bad)
