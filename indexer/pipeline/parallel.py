"""Keep the model busy: decode and preprocess in worker threads while the model embeds batches.

Pillow and torch release the GIL while decoding, resizing and normalising, so threads give
real parallelism without the start-up cost and pickling of worker processes. The window of
in-flight jobs is bounded, so memory stays flat on a folder of any size.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from loupe.indexer.pipeline.imageio import BadImage

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
