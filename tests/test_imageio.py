"""Decoding: formats, EXIF orientation and dates, draft mode, bad inputs, caption readers."""

from __future__ import annotations

import io
import json
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from indexer.errors import LoupeError
from indexer.imageio import BadImage, decode_image, image_extensions, probe_image
from indexer.sources import read_captions


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
    assert min(out.size) >= 224 and out.size[0] <= 1000  # decoded at 1/4 or 1/8 scale


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
