"""Embed a list of image files in order (`loupe eval`): the pipeline's read+decode and embed
units (`loupe.indexer.pipeline.stages`) composed without a catalog."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from loupe.indexer.pipeline.stages import decode_paths, embed_stream


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
