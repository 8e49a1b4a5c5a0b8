"""Decoding: formats, EXIF orientation and dates, draft mode, bad inputs, caption readers."""

from __future__ import annotations

import io
import json
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from loupe.indexer.errors import LoupeError
from loupe.indexer.pipeline.imageio import BadImage, decode_image, image_extensions, probe_image
from loupe.indexer.pipeline.sources import read_captions


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "BMP", "TIFF", "JPEG"])
def test_formats_decode_to_rgb(fmt):
    img = Image.new("RGB", (40, 30), (10, 120, 240))
    out, info = decode_image(_encode(img, fmt), 16)
    assert out.mode == "RGB" and out.size == (40, 30) and (info.width, info.height) == (40, 30)
    assert np.abs(np.asarray(out, dtype=int)[5, 5] - (10, 120, 240)).max() < 12


def test_animated_gif_uses_first_frame_and_alpha_goes_on_white():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out, _ = decode_image(buf.getvalue(), 8)
    assert out.getpixel((3, 3))[0] > 200 and out.getpixel((3, 3))[2] < 50
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    out, _ = decode_image(_encode(rgba, "PNG"), 8)
    assert out.getpixel((2, 2)) == (255, 255, 255)


def test_cmyk_and_grayscale_jpegs():
    for img in (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), Image.new("L", (32, 32), 128)):
        out, _ = decode_image(_encode(img, "JPEG"), 16)
        assert out.mode == "RGB"


def test_exif_orientation_and_capture_time():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    exif.get_ifd(0x8769)[0x9003] = "2020:02:29 13:14:15"
    data = _encode(img, "JPEG", exif=exif.tobytes())
    out, info = decode_image(data, 20)
    assert out.size == (20, 60) and (info.width, info.height) == (20, 60)
    assert np.asarray(out)[2, 10].mean() > 200  # the strip is now on top
    assert info.taken_at == datetime(2020, 2, 29, 13, 14, 15)
    probed = probe_image(data)
    assert (probed.width, probed.height, probed.taken_at) == (20, 60, info.taken_at)


def test_draft_mode_decodes_large_jpegs_small_but_not_below_model_size():
    big = Image.effect_noise((4000, 3000), 60).convert("RGB")
    out, info = decode_image(_encode(big, "JPEG", quality=85), 224)
    assert (info.width, info.height) == (4000, 3000)  # the catalog keeps the true size
    assert min(out.size) >= 224 and out.size[0] <= 2000  # decoded at 1/2 scale or less


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, I am text", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "corrupt|truncated|unreadable|not an image"),
    ],
)
def test_bad_inputs_raise_badimage(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data, 16)


def test_truncated_and_bomb():
    data = _encode(Image.effect_noise((300, 300), 50).convert("RGB"), "JPEG")
    with pytest.raises(BadImage, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2], 16)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(_encode(Image.new("1", (12000, 12000)), "PNG"), 16)


def test_extensions_cover_common_formats():
    exts = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".bmp", ".heic"} <= exts
    assert ".pdf" not in exts and ".txt" not in exts


def test_caption_readers(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert [c.text for c in read_captions(tmp_path / "a.txt")] == ["one", "two"]
    (tmp_path / "b.csv").write_text('id,caption,image\n1,"a, b",x.jpg\n2,c,y.jpg\n')
    caps = read_captions(tmp_path / "b.csv")
    assert [(c.text, c.image) for c in caps] == [("a, b", "x.jpg"), ("c", "y.jpg")]
    (tmp_path / "c.jsonl").write_text('{"sentence": "s1"}\n{"sentence": "s2"}\n')
    assert [c.text for c in read_captions(tmp_path / "c.jsonl")] == ["s1", "s2"]
    (tmp_path / "d.json").write_text(json.dumps([{"image": "i.jpg", "captions": ["x", "y"]}]))
    assert [(c.text, c.image, c.position) for c in read_captions(tmp_path / "d.json")] == [("x", "i.jpg", 0), ("y", "i.jpg", 1)]
    (tmp_path / "e.csv").write_text("id,other\n1,2\n")
    with pytest.raises(LoupeError, match="--column"):
        read_captions(tmp_path / "e.csv")
    (tmp_path / "f.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LoupeError, match="UTF-8"):
        read_captions(tmp_path / "f.txt")


# ---- high bit depth: 16-bit and float pictures are scaled to 8 bits, not clipped ----------


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grayscale only): gray, LA, RGB or RGBA."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if arr.ndim == 2 else arr.shape[2]]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _tiff16_rgb(arr: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit RGB TIFF written by hand (Pillow cannot write one)."""
    import struct

    h, w, _ = arr.shape
    data = arr.astype("<u2").tobytes()
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, None),
            (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    data_at = bits_at + 6
    ifd = b"".join(
        struct.pack("<HHII", tag, kind, n, bits_at if tag == 258 else data_at if tag == 273 else value)
        if kind == 4 or tag == 258 else struct.pack("<HHIHH", tag, kind, n, value, 0)
        for tag, kind, n, value in tags
    )
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + b"\x00" * 4 + struct.pack("<3H", 16, 16, 16) + data


@pytest.fixture(scope="module")
def photo8(flickr_images) -> np.ndarray:
    """A real photo as 8-bit RGB, small, stretched to use the full 0..255 range in every channel."""
    with Image.open(sorted(flickr_images.iterdir())[0]) as im:
        rgb = np.asarray(im.convert("RGB").resize((96, 72)), dtype=np.float64)
    lo, hi = rgb.min(axis=(0, 1)), rgb.max(axis=(0, 1))
    return np.round((rgb - lo) * 255 / (hi - lo)).astype(np.uint8)


def _deep(values8: np.ndarray) -> np.ndarray:
    """The 16-bit picture whose 8-bit reduction is `values8`: x257 plus sub-8-bit detail."""
    detail = np.random.default_rng(0).integers(-128, 129, size=values8.shape)
    return np.clip(values8.astype(np.int64) * 257 + detail, 0, 65535).astype(np.uint16)


def _high_depth_variants(photo8: np.ndarray) -> dict[str, tuple[bytes, bytes]]:
    """name -> (high bit depth file, 8-bit file of the same picture)."""
    gray8 = photo8[..., 1]
    gray16 = _deep(gray8)
    ref_gray = _encode(Image.fromarray(gray8), "PNG")
    ref_rgb = _encode(Image.fromarray(photo8), "PNG")
    stretched = gray8.astype(np.float32) * 3.5 - 120.0  # an HDR-like range: min-max scaled
    big_ints = gray8.astype(np.int32) * 1000 - 5000  # beyond 16 bits: min-max scaled
    return {
        "png I;16": (_encode(Image.fromarray(gray16), "PNG"), ref_gray),
        "png I;16 by hand": (_png16(gray16), ref_gray),
        "tiff I;16B": (_encode(Image.frombytes("I;16B", gray16.shape[::-1], gray16.astype(">u2").tobytes()), "TIFF"), ref_gray),
        "tiff I (16-bit values)": (_encode(Image.fromarray(gray16.astype(np.int32)), "TIFF"), ref_gray),
        "tiff I (wide range)": (_encode(Image.fromarray(big_ints), "TIFF"), ref_gray),
        "tiff F in [0, 1]": (_encode(Image.fromarray(gray16.astype(np.float32) / 65535), "TIFF"), ref_gray),
        "tiff F any range": (_encode(Image.fromarray(stretched), "TIFF"), ref_gray),
        "png 48-bit RGB": (_png16(_deep(photo8)), ref_rgb),
        "png 64-bit RGBA": (_png16(np.dstack([_deep(photo8), np.full(gray8.shape, 65535, np.uint16)])), ref_rgb),
        "tiff 48-bit RGB": (_tiff16_rgb(_deep(photo8)), ref_rgb),
    }


def test_high_bit_depth_decodes_like_its_8_bit_version(photo8):
    for name, (deep, ref) in _high_depth_variants(photo8).items():
        got = np.asarray(decode_image(deep, 16)[0], dtype=int)
        want = np.asarray(decode_image(ref, 16)[0], dtype=int)
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() <= 1, f"{name}: {np.abs(got - want).max()} levels off, mean {got.mean():.1f} vs {want.mean():.1f}"


def test_high_bit_depth_embeds_like_its_8_bit_version(photo8, tiny_encoder):
    """Same vector as the 8-bit file. The tiny random model puts even a blank white picture within
    a cosine of ~0.9996 of the photo, so the bar is 0.99999, and a blank control must miss it."""
    import torch

    variants = _high_depth_variants(photo8)
    files = [f for pair in variants.values() for f in pair] + [_encode(Image.new("L", photo8.shape[1::-1], 255), "PNG")]
    batch = [decode_image(f, tiny_encoder.image_size, tiny_encoder.preprocess)[0] for f in files]
    vecs = tiny_encoder.encode_images(torch.stack(batch)).astype(np.float64)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    assert float(vecs[-1] @ vecs[1]) < 0.99999  # the control: a blank picture does not pass
    for i, name in enumerate(variants):
        cosine = float(vecs[2 * i] @ vecs[2 * i + 1])
        assert cosine >= 0.99999, f"{name}: cosine {cosine:.6f}"


def test_float_pictures_with_non_finite_values_decode():
    values = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    values[0, :4] = [np.nan, np.inf, -np.inf, 0.5]
    out = np.asarray(decode_image(_encode(Image.fromarray(values), "TIFF"), 16)[0], dtype=int)
    assert out.shape == (48, 64, 3)
    assert out[47, 63, 0] == 255 and out[0, 4, 0] == 0  # the finite values still span 0..255
    assert list(out[0, :4, 0]) == [0, 255, 0, 128]  # nan and -inf as the minimum, +inf as the maximum
    flat = np.asarray(decode_image(_encode(Image.fromarray(np.full((8, 8), 7.5, np.float32)), "TIFF"), 16)[0])
    assert flat.min() == flat.max()  # a constant picture stays uniform (no division by zero)
