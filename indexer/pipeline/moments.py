"""A video as the indexer reads it: its moments streamed from a decoding thread, under a time limit.

`stream_moments(path, image_size, transform)` decodes in a thread of its own
(`loupe.indexer.pipeline.video.moments`) and hands (transform(frame), MomentInfo) over a small
bounded queue, so the model embeds one moment while the next scene is decoded, and memory stays
bounded on a video of any length. The whole file has a wall-clock budget (`time_limit`): checked
per packet inside the decoder, and again by the consumer, which never waits past the deadline
even if FFmpeg is stuck inside one call (the decoding thread is then abandoned, a daemon).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator

MAX_GAP_S = 10.0  # N: at least one moment per N seconds inside long scenes (docs/VIDEO.md)
TIME_LIMIT_BASE_S = 120.0  # per-file budget: this, plus
TIME_LIMIT_PER_SECOND = 0.5  # this many seconds per second of video (2x real time, 5x under the target speed)
QUEUE_MOMENTS = 8  # decoded moments waiting for the model


@dataclass
class MomentInfo:
    start: float
    time: float
    end: float


@dataclass
class VideoInfo:
    """What the catalog keeps about a video file (as `imageio.ImageInfo` for a photo), plus its duration."""

    width: int
    height: int
    taken_at: datetime | None
    duration: float


def file_hash(path: str, chunk: int = 1 << 20) -> str:
    """The content hash of a file read in chunks (the same value as `stages.content_hash` of its bytes)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _creation_time(path: str) -> datetime | None:
    import av

    try:
        with av.open(path, timeout=(10.0, 10.0)) as c:
            tags = dict(c.metadata or {})
            for s in c.streams.video[:1]:
                tags.update({k: v for k, v in (s.metadata or {}).items() if k not in tags})
    except Exception:  # noqa: BLE001 - the date is optional; probe() reports real problems
        return None
    raw = tags.get("creation_time") or tags.get("com.apple.quicktime.creationdate")
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=None) if when.year > 1971 else None


def video_info(path: str) -> VideoInfo:
    """Display size (rotation applied), creation time and duration; a `VideoError` if it cannot be read."""
    from loupe.indexer.pipeline.video import probe

    info = probe(path)
    duration = info.duration_s if info.duration_s == info.duration_s else 0.0
    return VideoInfo(info.width, info.height, _creation_time(path), float(duration))


def time_limit(duration_s: float) -> float:
    return TIME_LIMIT_BASE_S + TIME_LIMIT_PER_SECOND * max(0.0, duration_s)


_DONE = object()


def stream_moments(
    path: str, image_size: int, transform: Callable | None, time_limit_s: float | None = None, max_gap_s: float = MAX_GAP_S
) -> Iterator[tuple[object, MomentInfo]]:
    """(transform(frame), MomentInfo) for each moment of the video at `path`, in time order.

    Lazy: nothing is decoded before the first item is asked for. Raises a `VideoError` (a
    `BadImage`) when the file cannot be decoded or its time limit passes, possibly after some
    moments: a caller keeps a video's moments only when the iteration ends cleanly.
    """
    from loupe.indexer.pipeline.video import VideoTimeout, moments

    if time_limit_s is None:
        time_limit_s = time_limit(video_info(path).duration)
    deadline = time.monotonic() + time_limit_s
    out: queue.Queue = queue.Queue(maxsize=QUEUE_MOMENTS)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for m in moments(path, max_gap_s=max_gap_s, time_limit_s=time_limit_s, image_size=max(image_size, 224)):
                item = transform(m.image) if transform is not None else m.image
                if not put((item, MomentInfo(m.start_s, m.time_s, m.end_s))):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    worker = threading.Thread(target=produce, name="loupe-video", daemon=True)
    started = False
    try:
        while True:
            if not started:
                worker.start()
                started = True
            left = deadline + 5.0 - time.monotonic()  # the decoder checks the deadline itself; this is the backstop
            try:
                item = out.get(timeout=max(0.01, left))
            except queue.Empty:
                raise VideoTimeout(f"time limit {time_limit_s:.0f}s exceeded (decoder not responding)") from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
