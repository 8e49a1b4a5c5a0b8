"""Decoding photos for the model: fast, orientation-correct, and safe against bad files.

Every reader in loupe (indexing, queries by image, eval, training) goes through `decode_image`,
which ends in the model's own open_clip preprocess (resize, crop, normalise), in one of two modes:

- photos (indexing, queries by image): JPEGs are decoded in draft mode (libjpeg's DCT scaling)
  but never below `DRAFT_FACTOR` (5) times the model's input side, which keeps large photos several
  times cheaper to decode while image vectors stay within cosine 0.999 of the reference
  (benchmarks/bench_fidelity.py); EXIF orientation is applied and transparency goes on white,
  since people see their photos upright.
- reference (`loupe eval`, `loupe train`): exactly PIL open -> `.convert("RGB")` -> preprocess,
  the pipeline of CLIP_benchmark and of published recall tables, so eval figures are
  comparable with them; like them it ignores EXIF orientation. Training uses the same pixels
  as evaluation, so a trained model is scored on what it learnt from.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps

try:  # HEIC/HEIF photos (iPhones) when the optional pillow-heif is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - optional
    pass

ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce the pixel limit ourselves (thread-safe, and reported as a skip reason).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
MAX_PIXELS = int(os.environ.get("LOUPE_MAX_PIXELS", Image.MAX_IMAGE_PIXELS or 89_478_485))
Image.MAX_IMAGE_PIXELS = None

# Formats Pillow can open without external programs; formats that need Ghostscript or are
# scientific containers are left out so a folder of PDFs or EPS files is not "bad images".
_UNWANTED_FORMATS = {"EPS", "PDF", "BUFR", "GRIB", "HDF5", "FITS", "MPEG", "XVTHUMB"}
# JPEG draft decoding (libjpeg's DCT scaling by 1/2, 1/4, 1/8) stops at this multiple of the model's
# input side. Measured with a small trained model (the sensitive case; benchmarks/RESULTS.md,
# "Faithful pixels"): drafting straight to the input side moved image vectors to cosine 0.91 of
# the reference, 3 to 4.4 times the side to 0.997-0.998, and from 5 times on every photo stayed
# above 0.9996, at every scale. A 12 MP photo still decodes at 1/2 scale for a 224 px model.
DRAFT_FACTOR = 5.0


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with dot) that loupe tries to index as images."""
    Image.init()
    exts = {
        ext.lower()
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt not in _UNWANTED_FORMATS
    }
    exts |= {".heic", ".heif", ".avif"}
    return frozenset(exts)


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the skip reason kept in the catalog."""


@dataclass
class ImageInfo:
    """What the catalog keeps about a picture besides its vector."""

    width: int
    height: int
    taken_at: datetime | None


def _exif_datetime(img: Image.Image) -> datetime | None:
    try:
        exif = img.getexif()
    except Exception:
        return None
    if not exif:
        return None
    try:
        sub = exif.get_ifd(0x8769)  # Exif IFD
    except Exception:
        sub = {}
    for raw in (sub.get(0x9003), sub.get(0x9004), exif.get(0x0132)):  # Original, Digitized, DateTime
        if isinstance(raw, bytes):
            raw = raw.decode("ascii", "ignore")
        if isinstance(raw, str):
            raw = raw.strip().rstrip("\x00")
            for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M"):
                try:
                    return datetime.strptime(raw[:19], fmt)
                except ValueError:
                    continue
    return None


def _open(source: bytes | str | os.PathLike, formats: tuple[str, ...] | None = None) -> Image.Image:
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    if isinstance(source, (bytes, bytearray, memoryview)) and len(source) == 0:
        raise BadImage("empty file")
    try:
        if formats is not None:
            Image.init()
            formats = tuple(f for f in formats if f in Image.OPEN)  # HEIF/AVIF only where installed
        img = Image.open(fp, formats=list(formats) if formats is not None else None)
    except FileNotFoundError:
        raise
    except Image.UnidentifiedImageError:
        if formats is not None:
            raise BadImage(f"not an image in an accepted format ({', '.join(formats)})") from None
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as exc:
        raise BadImage(f"unreadable header: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"invalid size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise BadImage(f"decompression bomb: {w}x{h} pixels exceeds the {MAX_PIXELS} pixel limit")
    return img


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            return h, w
    except Exception:
        pass
    return w, h


def probe_image(source: bytes | str | os.PathLike) -> ImageInfo:
    """Read only the header: size (after EXIF rotation) and capture time. No pixel decoding."""
    with _open(source) as img:
        w, h = _oriented_size(img)
        return ImageInfo(width=w, height=h, taken_at=_exif_datetime(img))


def exif_rotated(path: str | os.PathLike) -> bool:
    """Whether a file's EXIF asks viewers to rotate or flip it (orientation other than 1).

    Header only. The reference pixels ignore it; `loupe eval` counts such images to say so.
    """
    try:
        with Image.open(path) as img:
            return img.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:
        return False


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _scaled_to_8_bits(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel picture as 8-bit 'L', scaled, not clipped.

    Pillow's own `convert` clips these to 0..255, so a 16-bit scan (values up to 65535) comes out
    white and a float picture in [0, 1] black. Scaling: 16-bit data (I;16*, and 'I' whose values
    all lie in 0..65535) maps 0..65535 to 0..255; a float picture ('F') whose finite values lie in
    [0, 1] is multiplied by 255; any other 'I' or 'F' picture is stretched from its minimum to its
    maximum (non-finite values count as the minimum, or the maximum for +inf); a constant one
    keeps its value, clipped to 0..255. (Pillow already reduces 16-bit RGB and RGBA to 8 bits.)
    """
    values = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES or (
        img.mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535
    ):
        out = np.empty(values.shape, np.uint8)
        for rows in _tiles(values.shape[0], values.shape[1]):  # at most one tile of uint32 at a time
            tile = values[rows].astype(np.uint32)
            tile *= 255
            tile += 32767
            tile //= 65535
            out[rows] = tile
        return Image.fromarray(out)
    # float pictures: min and max over finite values, then scaled tile by tile in float32 (never a
    # float64 copy of the whole picture: a 9400x9400 float TIFF once took 4 GB here)
    lo, hi, posinf = math.inf, -math.inf, False
    for rows in _tiles(values.shape[0], values.shape[1]):
        tile = values[rows]
        finite = np.isfinite(tile)
        if finite.all():
            if tile.size:
                lo, hi = min(lo, float(tile.min())), max(hi, float(tile.max()))
        elif finite.any():
            lo, hi = min(lo, float(tile[finite].min())), max(hi, float(tile[finite].max()))
    if lo > hi:
        lo = hi = 0.0
    out = np.empty(values.shape, np.uint8)
    for rows in _tiles(values.shape[0], values.shape[1]):
        tile = np.nan_to_num(values[rows].astype(np.float32), copy=False, nan=lo, posinf=hi, neginf=lo)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            tile *= np.float32(255.0)
        elif hi > lo:
            tile -= np.float32(lo)
            tile *= np.float32(255.0 / (hi - lo))
        else:
            tile[...] = min(max(lo, 0.0), 255.0)
        np.clip(tile, 0, 255, out=tile)
        np.rint(tile, out=tile)
        out[rows] = tile
    return Image.fromarray(out)


TILE_BYTES = 4 << 20  # high-bit-depth scaling works on row bands of about this many float32 bytes


def _tiles(height: int, width: int):
    step = max(1, TILE_BYTES // (4 * max(1, width)))
    for start in range(0, height, step):
        yield slice(start, min(height, start + step))


# ---- budgets for pictures from strangers (the web server's uploads and previews) -------------

# Formats an upload may be: what people drop on a page. Nothing that runs an external program
# (EPS/PS via Ghostscript) or that no camera or browser writes.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "MPO", "HEIF", "AVIF")
# Bytes per pixel of a decoded raster, by mode (unknown modes count 4)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
DECODE_BUDGET = int(os.environ.get("LOUPE_DECODE_BUDGET", 160 << 20))  # bytes one web decode may hold at its peak


def decode_cost(img: Image.Image) -> int:
    """Bytes a decode of `img` (header read, draft applied) holds at its peak: the raster as
    decoded, plus the 8-bit RGB copy (and, for high-bit-depth pictures, the 8-bit gray band)."""
    w, h = img.size
    raw = w * h * _MODE_BYTES.get(img.mode, 4)
    return raw + w * h * (4 if img.mode in _SIXTEEN_BIT_MODES + ("I", "F") else 3)


def open_within_budget(
    source: bytes, min_size: int = 0, *, max_bytes: int = DECODE_BUDGET, formats: tuple[str, ...] | None = UPLOAD_FORMATS,
    draft_factor: float = DRAFT_FACTOR, max_pixels: int | None = None,
) -> Image.Image:
    """Open `source` (header only) and check it may be decoded: a format in `formats` (None: any
    format the indexer reads), at most `max_pixels`, and at most `max_bytes` at the decode's peak
    (after JPEG draft scaling for `min_size`). BadImage otherwise, before any pixel is decoded."""
    img = _open(source, formats)
    try:
        if formats is None and img.format in _UNWANTED_FORMATS:
            raise BadImage(f"{img.format} pictures are not served")
        if img.format == "JPEG" and min_size > 0 and draft_factor > 0:
            side = math.ceil(draft_factor * min_size)
            img.draft("RGB", (side, side))
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise BadImage(f"too large: {w}x{h} pixels, the limit is {max_pixels}")
        if decode_cost(img) > max_bytes:
            raise BadImage(f"too large to decode here: {w}x{h} {img.mode} pixels need over {max_bytes >> 20} MiB")
    except BaseException:
        img.close()
        raise
    return img


_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return _scaled_to_8_bits(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_image(
    source: bytes | str | os.PathLike,
    min_size: int,
    transform: Callable[[Image.Image], object] | None = None,
    *,
    reference: bool = False,
    draft_factor: float = DRAFT_FACTOR,
    max_bytes: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> tuple[object, ImageInfo]:
    """Decode a picture to RGB for a model whose input side is `min_size`, then `transform` it.

    Photos mode (default): JPEGs are draft-decoded to no less than `draft_factor * min_size`
    on their short side (0 turns draft mode off), EXIF orientation is applied, transparency
    goes on white. `reference=True`: PIL open -> `.convert("RGB")`, nothing else (see the
    module docstring). Returns (transformed image, info). Raises BadImage with a readable
    reason for anything corrupt, truncated, empty, oversized or not an image. GIFs and other
    animations use frame 0. `max_bytes` (the web server's pictures): refuse, before decoding, a
    picture whose decode would hold more (`open_within_budget`), or not in `formats`.
    """
    if max_bytes is not None and not reference and isinstance(source, (bytes, bytearray, memoryview)):
        img = open_within_budget(bytes(source), min_size, max_bytes=max_bytes, formats=formats, draft_factor=draft_factor)
    else:
        img = _open(source, formats)
    try:
        info = ImageInfo(*_oriented_size(img), taken_at=_exif_datetime(img))
        if not reference and img.format == "JPEG" and min_size > 0 and draft_factor > 0:
            side = math.ceil(draft_factor * min_size)
            img.draft("RGB", (side, side))
        try:
            img.load()
        except Exception as exc:
            raise BadImage(f"corrupt or truncated image data: {exc}") from None
        if reference:
            rgb = img.convert("RGB")
        else:
            turn = None
            if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
                try:
                    turn = _TRANSPOSES.get(img.getexif().get(0x0112))
                except Exception:
                    turn = None
                deep, img = img, _scaled_to_8_bits(img)  # 8 bits first: the deep raster goes at once
                deep.close()
                if turn is not None:
                    img = img.transpose(turn)
            else:
                try:
                    img = ImageOps.exif_transpose(img) or img
                except Exception:
                    pass  # a broken orientation tag should not lose the photo
            rgb = _to_rgb(img)
        if transform is not None:
            return transform(rgb), info
        return (rgb.copy() if rgb is img else rgb), info  # `img` is closed below
    finally:
        img.close()
