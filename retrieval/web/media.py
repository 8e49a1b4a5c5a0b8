"""Pictures for the web page: thumbnails (cached on disk by content hash) and previews.

Only catalogued files are ever read, addressed by catalog row id (never by a path from the
request), and only when the file is still a regular file at its catalogued path whose real
path lies under an indexed folder, or whose bytes are still the catalogued content (a photo
reached through a folder symlink). A catalogued file swapped for a symlink to anything else is
refused. Pixels come from the indexer's bomb-safe decoder (`loupe.indexer.pipeline.imageio`): draft-mode JPEG,
EXIF orientation applied.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from loupe.indexer.pipeline.imageio import DECODE_BUDGET, BadImage, decode_image
from loupe.indexer.pipeline.stages import content_hash

THUMB_SIDE = 256  # short side of a thumbnail, in pixels (long side at most twice that)
PREVIEW_SIDE = 2048  # long side of a preview
MAX_ORIGINAL = 512 << 20  # bytes read from one original, at most
ORIGINAL_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


class NotServable(Exception):
    """A catalogued file that cannot be served now (gone, replaced, unreadable): answered 404."""


def _thumb_format() -> tuple[str, str, str]:
    from PIL import features

    return ("WEBP", "image/webp", ".webp") if features.check("webp") else ("JPEG", "image/jpeg", ".jpg")


THUMB_FORMAT, THUMB_TYPE, THUMB_EXT = _thumb_format()


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def read_catalogued(path: str, expected_hash: str | None, roots: list[str]) -> tuple[bytes, str]:
    """The bytes of a catalogued file and their content hash, if it may be served (else NotServable).

    It must be a regular file (no device, FIFO or folder) of at most MAX_ORIGINAL bytes; its real
    path must lie under an indexed folder's real path, or its bytes must be the catalogued
    content. The file is opened once and the checks are made on that open file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise NotServable(f"the file is not available: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, FIFO or device: fdopen could fail or hang
            raise NotServable("not a regular file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)  # never leak the descriptor
        raise
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise NotServable("not a regular file")
        if st.st_size > MAX_ORIGINAL:
            raise NotServable("the file is too large to serve")
        real = os.path.realpath(path)
        try:
            same = os.stat(real)
            inside = (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino) and any(
                _under(real, os.path.realpath(r)) for r in roots
            )
        except OSError:
            inside = False
        data = f.read(MAX_ORIGINAL + 1)
    digest = content_hash(data)
    if not inside and digest != expected_hash:
        raise NotServable("the file now lies outside the indexed folders")
    return data, digest


@dataclass
class Picture:
    data: bytes
    media_type: str


def make_thumbnail(data: bytes, side: int = THUMB_SIDE) -> Picture:
    """About `side` px on the short side (long side capped at 2x), EXIF-rotated, WebP (or JPEG)."""
    img, _ = decode_image(data, side, max_bytes=DECODE_BUDGET)
    w, h = img.size
    scale = min(side / min(w, h), 2 * side / max(w, h), 1.0)
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    if THUMB_FORMAT == "WEBP":
        img.save(out, "WEBP", quality=80, method=2)
    else:
        img.save(out, "JPEG", quality=82, optimize=False)
    return Picture(out.getvalue(), THUMB_TYPE)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def make_preview(data: bytes, full: bool = False, side: int = PREVIEW_SIDE) -> Picture:
    """A large view: the original bytes when `full` and no rotation is needed and browsers show the
    format; else re-encoded JPEG, EXIF-rotated, long side at most `side` (unless `full`)."""
    from loupe.indexer.pipeline.imageio import _open

    with _open(data) as probe:
        fmt, orientation, (w, h) = probe.format, _orientation(probe), probe.size
    if full and orientation == 1 and fmt in ORIGINAL_TYPES:
        return Picture(data, ORIGINAL_TYPES[fmt])
    long_side = max(w, h)
    wanted = 0 if full or long_side <= side else max(1, (side * min(w, h)) // long_side)
    # the same budget as uploads: a picture whose decode would hold more is not previewed
    img, _ = decode_image(data, wanted, max_bytes=DECODE_BUDGET, draft_factor=1.0)
    if not full and max(img.size) > side:
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return Picture(out.getvalue(), "image/jpeg")


def exif_summary(data: bytes) -> dict:
    """Camera make/model and capture time from a picture's header (no pixel decoding)."""
    from loupe.indexer.pipeline.imageio import _exif_datetime, _open

    try:
        with _open(data) as img:
            exif = img.getexif()
            make = str(exif.get(0x010F) or "").strip("\x00 ")
            model = str(exif.get(0x0110) or "").strip("\x00 ")
            taken = _exif_datetime(img)
    except (BadImage, OSError):
        return {"camera": None, "taken_at": None}
    camera = model if make and model.lower().startswith(make.lower()) else " ".join(x for x in (make, model) if x)
    return {"camera": camera or None, "taken_at": taken.isoformat(timespec="seconds") if taken else None}


class ThumbCache:
    """Thumbnails on disk beside the index, `<dir>/ab/abcdef....webp`, keyed by content hash."""

    def __init__(self, folder: Path, ext: str = THUMB_EXT) -> None:
        self.folder = Path(folder)
        self.ext = ext

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}{self.ext}"

    def get(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except OSError:
            return None

    def put(self, digest: str, data: bytes) -> None:
        """Write atomically (temp file + rename); a cache that cannot be written is no error."""
        target = self.path(digest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=self.ext)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass


# ---- videos ---------------------------------------------------------------------------------
VIDEO_TYPES = {
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo", ".3gp": "video/3gpp", ".mts": "video/mp2t", ".m2ts": "video/mp2t",
}
RANGE_MAX = 4 << 20  # bytes answered to one Range request, at most (a player asks again for the rest)
VIDEO_CHUNK = 256 << 10  # bytes read at a time while answering


def open_catalogued_video(path: str, size: int, mtime_ns: int, roots: list[str]):
    """An open binary file of a catalogued video (else NotServable): a regular file whose real path
    lies under an indexed folder's real path, the very file at the catalogued path (no swap for a
    symlink meanwhile), with the catalogued size and modification time (a video is too large to
    hash per request: a changed file is refused until it is indexed again)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise NotServable(f"the file is not available: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotServable("not a regular file")
        real = os.path.realpath(path)
        try:
            same = os.stat(real)
        except OSError:
            raise NotServable("the file is not available") from None
        if (same.st_dev, same.st_ino) != (st.st_dev, st.st_ino) or not any(_under(real, os.path.realpath(r)) for r in roots):
            raise NotServable("the file lies outside the indexed folders")
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            raise NotServable("the file changed since it was indexed")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class BadRange(Exception):
    """A Range header that cannot be answered: 416."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [first, last] bytes of a single `bytes=` range (clamped to RANGE_MAX), or None for no
    Range header; BadRange for a malformed, multiple or unsatisfiable one."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec or len(header) > 100:
        raise BadRange("only one bytes range is answered")
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash or not (first_s.isdigit() or first_s == "") or not (last_s.isdigit() or last_s == "") or (first_s == last_s == ""):
        raise BadRange("malformed range")
    if first_s == "":  # the last N bytes
        n = int(last_s)
        if n == 0 or size == 0:
            raise BadRange("empty range")
        first, last = max(0, size - n), size - 1
    else:
        first = int(first_s)
        last = min(int(last_s), size - 1) if last_s else size - 1
        if first >= size or last < first:
            raise BadRange("range outside the file")
    return first, min(last, first + RANGE_MAX - 1)


def video_frame_thumbnail(f, time_s: float, side: int = THUMB_SIDE) -> Picture:
    """A thumbnail of a video's frame at `time_s` (an open file of it), as `make_thumbnail`."""
    from loupe.indexer.pipeline.video import frame_at

    img = frame_at(f, time_s, max_side=2 * side)
    w, h = img.size
    scale = min(side / min(w, h), 2 * side / max(w, h), 1.0)
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    if THUMB_FORMAT == "WEBP":
        img.save(out, "WEBP", quality=80, method=2)
    else:
        img.save(out, "JPEG", quality=82)
    return Picture(out.getvalue(), THUMB_TYPE)
