"""Media kinds: what the reader side indexes. A kind is a set of file extensions and a decoder
that turns a file into its items (a photo is one item; a video one item per moment, read from its
path as a stream, see `loupe.indexer.pipeline.video`).

`MEDIA_KINDS` lists the kinds; the walk lists files by their extensions and the read+decode
stage decodes each with its kind's decoder.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from loupe.indexer.pipeline.imageio import DRAFT_FACTOR, decode_image, image_extensions


@dataclass(frozen=True)
class MediaKind:
    """`decode(data, min_size, transform, draft_factor)` -> [(transform(rgb), info)] for each
    item of the file: `rgb` is a decoded RGB picture (no smaller than `min_size` on its short side
    where the format can decode smaller, `draft_factor` times that for a model), `info` what the
    catalog keeps about it (`imageio.ImageInfo`)."""

    name: str
    extensions: Callable[[], frozenset[str]]
    decode: Callable[..., list[tuple[object, object]]] | None
    # a kind of many items per file, read from its path: `stream(path, image_size, transform,
    # time_limit_s)` -> an iterator of (transform(rgb), MomentInfo), and `probe(path)` -> its info
    stream: Callable[..., Iterator[tuple[object, object]]] | None = None
    probe: Callable[[str], object] | None = None


def _decode_photo(data: bytes, min_size: int, transform: Callable, draft_factor: float = DRAFT_FACTOR) -> list:
    return [decode_image(data, min_size, transform, draft_factor=draft_factor)]


def _video_extensions() -> frozenset[str]:
    from loupe.indexer.pipeline.video import VIDEO_EXTENSIONS  # PyAV loads only when a video is read

    return VIDEO_EXTENSIONS


def _stream_video(path: str, image_size: int, transform: Callable, time_limit_s: float | None = None) -> Iterator:
    from loupe.indexer.pipeline.moments import stream_moments

    return stream_moments(path, image_size, transform, time_limit_s)


def _probe_video(path: str) -> object:
    from loupe.indexer.pipeline.moments import video_info

    return video_info(path)


PHOTOS = MediaKind("photo", image_extensions, _decode_photo)
VIDEOS = MediaKind("video", _video_extensions, None, _stream_video, _probe_video)
MEDIA_KINDS: tuple[MediaKind, ...] = (PHOTOS, VIDEOS)


def extensions(kinds: "frozenset[str] | None" = None) -> frozenset[str]:
    """Lower-case extensions (with dot) of every media kind (of those named in `kinds`, if given)."""
    return frozenset().union(*(k.extensions() for k in MEDIA_KINDS if kinds is None or k.name in kinds))


def is_video(path: str) -> bool:
    return kind_of(path) is VIDEOS


@functools.cache
def _by_extension() -> dict[str, MediaKind]:
    return {ext: kind for kind in reversed(MEDIA_KINDS) for ext in kind.extensions()}


def kind_of(path: str) -> MediaKind:
    """The kind that reads `path` (by extension; photos for anything else, as a file list may name any file)."""
    return _by_extension().get(os.path.splitext(path)[1].lower(), PHOTOS)
