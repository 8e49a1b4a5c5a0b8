"""Media kinds: what the reader side indexes. A kind is a set of file extensions and a decoder
that turns a file's bytes into its items (a photo is one item; video frames come next).

`MEDIA_KINDS` lists the kinds; the walk lists files by their extensions and the read+decode
stage decodes each with its kind's decoder.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

from loupe.indexer.pipeline.imageio import DRAFT_FACTOR, decode_image, image_extensions


@dataclass(frozen=True)
class MediaKind:
    """`decode(data, min_size, transform, draft_factor)` -> [(transform(rgb), info)] for each
    item of the file: `rgb` is a decoded RGB picture (no smaller than `min_size` on its short side
    where the format can decode smaller, `draft_factor` times that for a model), `info` what the
    catalog keeps about it (`imageio.ImageInfo`)."""

    name: str
    extensions: Callable[[], frozenset[str]]
    decode: Callable[..., list[tuple[object, object]]]


def _decode_photo(data: bytes, min_size: int, transform: Callable, draft_factor: float = DRAFT_FACTOR) -> list:
    return [decode_image(data, min_size, transform, draft_factor=draft_factor)]


PHOTOS = MediaKind("photo", image_extensions, _decode_photo)
MEDIA_KINDS: tuple[MediaKind, ...] = (PHOTOS,)


def extensions() -> frozenset[str]:
    """Lower-case extensions (with dot) of every media kind."""
    return frozenset().union(*(k.extensions() for k in MEDIA_KINDS))


@functools.cache
def _by_extension() -> dict[str, MediaKind]:
    return {ext: kind for kind in reversed(MEDIA_KINDS) for ext in kind.extensions()}


def kind_of(path: str) -> MediaKind:
    """The kind that reads `path` (by extension; photos for anything else, as a file list may name any file)."""
    return _by_extension().get(os.path.splitext(path)[1].lower(), PHOTOS)
