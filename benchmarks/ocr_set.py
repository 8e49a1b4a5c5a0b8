"""The labelled set for text in photos: made-up words drawn into real flickr8k photos
(benchmarks/bench_ocr.py measures on it; tests/test_ocr.py draws from it).

`make_fixtures(n_per_kind=..., seed=0)` returns a list of `Fixture(image, orientation, words, kind)`:

- image: a PIL image *as stored on disk* (JPEG-encoded in memory; for kind "exif" the pixels are
  stored sideways and the EXIF Orientation tag says how to turn them upright, exactly like a phone
  photo). Callers must apply `PIL.ImageOps.exif_transpose` first, as loupe's decoder does.
- orientation: the EXIF orientation value written (1 = none).
- words: the made-up words that a reader must find (empty for "notext" and for plate decoys,
  whose strings are in `decoy`).
- kind: sign | plate | decoy | document | exif | vertical | chinese | small | blur | lowcontrast | notext

Base photos are flickr8k_800 JPEGs (200x150) upscaled to 800 px on the long side, so drawn text
is crisp at realistic relative sizes; the photos are only read, never copied. Words are random
consonant/vowel strings (>= 5 letters, so they never occur in real photos), a few with accents or
full-width letters to test folding. Everything is seeded: the same call gives the same pixels.
"""

from __future__ import annotations

import glob
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

PHOTOS = "/work/shared/data/flickr8k_800/images"
FONTS = [  # Debian fonts-dejavu and fonts-liberation (.ci/run installs them); missing ones are left out
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSerif-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansCondensed-Oblique.ttf",
]
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"  # Debian fonts-wqy-microhei
PLATE_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"
# Common characters; random 3-4 character combinations of them are not real words.
CJK_CHARS = "山水火木金土日月星云风雨花草鸟鱼龙虎马牛羊书画茶酒米面店街路桥城门东西南北中天海湖江河岛林"
KINDS = ("sign", "plate", "document", "exif", "vertical", "chinese", "small", "blur", "lowcontrast", "notext")


@dataclass
class Fixture:
    image: Image.Image
    orientation: int
    words: list[str]
    kind: str
    decoy: list[str] = field(default_factory=list)
    photo: str = ""


def made_up_word(rng: random.Random, n: int | None = None) -> str:
    cons, vows = "bcdfghjklmnprstvzx", "aeiou"
    n = n or rng.randint(5, 8)
    return "".join(rng.choice(cons if i % 2 == 0 else vows) for i in range(n))


def have_fonts() -> bool:
    """Whether the Latin fonts are installed (the set needs at least DejaVu)."""
    return all(Path(f).exists() for f in FONTS[:2] + [PLATE_FONT])


def have_cjk_font() -> bool:
    return Path(CJK_FONT).exists()


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    if not Path(path).exists():  # Liberation missing: DejaVu stands in
        path = FONTS[0] if "Bold" in path else FONTS[1]
    return ImageFont.truetype(path, size)


def _base(path: str, long_side: int = 800) -> Image.Image:
    img = Image.open(path).convert("RGB")
    r = long_side / max(img.size)
    return img.resize((round(img.width * r), round(img.height * r)), Image.BICUBIC)


def _label(text: str, font, fg, bg, pad: float = 0.35, vertical: bool = False) -> Image.Image:
    """Text on a plate (RGBA, transparent outside the plate). vertical: one character per line."""
    lines = list(text) if vertical else text.split("\n")
    asc, desc = font.getmetrics()
    lh = asc + desc
    widths = [font.getbbox(line)[2] for line in lines]
    p = int(lh * pad)
    w, h = max(widths) + 2 * p, lh * len(lines) + 2 * p
    im = Image.new("RGBA", (w, h), bg)
    d = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        x = p + (max(widths) - widths[i]) // 2 if vertical else p
        d.text((x, p + i * lh), line, font=font, fill=fg)
    return im


def _paste(base: Image.Image, label: Image.Image, rng: random.Random, angle: float = 0.0) -> Image.Image:
    if angle:
        label = label.rotate(angle, expand=True, resample=Image.BICUBIC)
    if label.width > base.width * 0.95 or label.height > base.height * 0.95:
        r = min(base.width * 0.95 / label.width, base.height * 0.95 / label.height)
        label = label.resize((max(1, int(label.width * r)), max(1, int(label.height * r))), Image.BICUBIC)
    x = rng.randint(0, base.width - label.width)
    y = rng.randint(0, base.height - label.height)
    base.paste(label, (x, y), label)
    return base


def _stored(img: Image.Image, orientation: int = 1, quality: int = 90) -> Image.Image:
    """Encode as a JPEG (with an Orientation tag if not 1) and reopen, like a file on disk."""
    buf = io.BytesIO()
    if orientation != 1:
        # Store the pixels so that exif_transpose(orientation) brings them upright.
        inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
        img = img.transpose(inverse[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _colors(rng: random.Random, contrast: str = "high"):
    if contrast == "low":
        v = rng.randint(90, 150)
        return (v, v, v, 255), (v + 28, v + 24, v + 20, 255)
    pairs = [((255, 255, 255, 255), (20, 90, 40, 255)), ((0, 0, 0, 255), (250, 215, 0, 255)),
             ((255, 255, 255, 255), (30, 50, 160, 255)), ((20, 20, 20, 255), (240, 240, 235, 255)),
             ((255, 255, 255, 255), (180, 20, 20, 255))]
    return rng.choice(pairs)


def make_fixtures(n_per_kind: int = 6, seed: int = 0, photos: str = PHOTOS, kinds: tuple[str, ...] = KINDS) -> list[Fixture]:
    """`n_per_kind` photos of each kind (plates come with as many decoys), seeded; `kinds` keeps some."""
    every = _make(n_per_kind, seed, photos)
    return [f for f in every if f.kind in kinds or (f.kind == "decoy" and "plate" in kinds)]


def write_set(folder: Path, fixtures: list[Fixture]) -> dict[str, Fixture]:
    """Save the drawn photos (EXIF orientation kept) as NN_kind.jpg; name -> fixture."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, f in enumerate(fixtures):
        name = f"{k:02d}_{f.kind}.jpg"
        f.image.save(folder / name, exif=f.image.getexif())
        out[name] = f
    return out


def _make(n_per_kind: int, seed: int, photos: str) -> list[Fixture]:
    rng = random.Random(seed)
    paths = sorted(glob.glob(str(Path(photos) / "*.jpg")))
    photo_iter = iter(rng.sample(paths, min(len(paths), 14 * n_per_kind + 10)))
    used: set[str] = set()

    def word(n=None):
        while True:
            w = made_up_word(rng, n)
            if w not in used:
                used.add(w)
                return w

    def style(w):  # case variety, so folding is exercised
        return rng.choice([w.upper(), w.capitalize(), w])

    out: list[Fixture] = []
    for i in range(n_per_kind):
        # sign: 1-2 words, several fonts, sizes, tilts
        p = next(photo_iter); b = _base(p)
        ws = [word() for _ in range(rng.choice([1, 2]))]
        if i == 1:
            ws[0] = ws[0][:2] + "é" + ws[0][3:]  # accent: searchable without it
        if i == 2:
            ws[0] = "".join(chr(ord(c) - 0x20 + 0xFF00) for c in ws[0].upper())  # full-width
        fg, bg = _colors(rng)
        font = FONTS[i % len(FONTS)]
        if i == 2 and have_cjk_font():  # the Latin fonts have no full-width forms: they would draw empty boxes
            font = CJK_FONT
        lab = _label(" ".join(style(w) if i != 2 else w for w in ws), _font(font, rng.randint(34, 70)), fg, bg)
        out.append(Fixture(_stored(_paste(b, lab, rng, rng.uniform(-15, 15))), 1, ws, "sign", photo=p))

        # plates: the true plate RE16 + suffix, and decoys RE61 / RF16 in other photos
        suffix = "".join(rng.choice("ABCDHKMNPTXZ") for _ in range(3))
        for kind, code in (("plate", "RE16"), ("decoy", rng.choice(["RE61", "RF16", "RE18", "PE16"]))):
            p = next(photo_iter); b = _base(p)
            text = f"{code} {suffix}" if i % 2 == 0 else f"{suffix}{code[2:]} {code[:2]}X"
            if i % 2 == 1:  # code not contiguous: plate still holds "RE16"? keep it contiguous
                text = f"{rng.randint(1, 9)}{code}{suffix}"
            lab = _label(text, _font(PLATE_FONT, rng.randint(30, 52)), (10, 10, 10, 255), (245, 245, 245, 255), pad=0.25)
            f = Fixture(_stored(_paste(b, lab, rng, rng.uniform(-6, 6))), 1, [], kind, photo=p)
            (f.words if kind == "plate" else f.decoy).append(text)
            out.append(f)

        # document: 3-4 lines of two words on a white sheet
        p = next(photo_iter); b = _base(p)
        lines = [[word(), word()] for _ in range(rng.randint(3, 4))]
        lab = _label("\n".join(" ".join(style(w) for w in ln) for ln in lines),
                     _font(FONTS[(i + 1) % len(FONTS)], rng.randint(24, 34)), (20, 20, 20, 255), (248, 248, 240, 255))
        out.append(Fixture(_stored(_paste(b, lab, rng, rng.uniform(-5, 5))), 1, [w for ln in lines for w in ln], "document", photo=p))

        # exif: upright sign, stored sideways / upside down with an Orientation tag
        p = next(photo_iter); b = _base(p)
        w = word(); fg, bg = _colors(rng)
        lab = _label(style(w), _font(FONTS[(i + 2) % len(FONTS)], rng.randint(40, 64)), fg, bg)
        out.append(Fixture(_stored(_paste(b, lab, rng), orientation=(6, 8, 3)[i % 3]), (6, 8, 3)[i % 3], [w], "exif", photo=p))

        # vertical: stacked letters (like a hotel sign) or a word rotated 90 degrees
        p = next(photo_iter); b = _base(p)
        w = word(rng.randint(5, 7)); fg, bg = _colors(rng)
        if i % 2 == 0:
            lab = _label(w.upper(), _font(FONTS[0], rng.randint(30, 44)), fg, bg, vertical=True)
            ang = 0
        else:
            lab = _label(style(w), _font(FONTS[i % len(FONTS)], rng.randint(36, 56)), fg, bg)
            ang = rng.choice([90, -90])
        out.append(Fixture(_stored(_paste(b, lab, rng, ang)), 1, [w], "vertical", photo=p))

        # chinese: horizontal sign, or vertical (stacked) every third one
        p = next(photo_iter); b = _base(p)
        zh = "".join(rng.sample(CJK_CHARS, rng.choice([3, 4])))
        fg, bg = _colors(rng)
        if have_cjk_font():  # without the font there are no Chinese photos (tests skip them)
            lab = _label(zh, _font(CJK_FONT, rng.randint(40, 64)), fg, bg, vertical=(i % 3 == 2))
            out.append(Fixture(_stored(_paste(b, lab, rng, rng.uniform(-5, 5))), 1, [zh], "chinese", photo=p))

        # small: ~2-3% of the image height
        p = next(photo_iter); b = _base(p)
        w = word(); fg, bg = _colors(rng)
        lab = _label(style(w), _font(FONTS[(i + 3) % len(FONTS)], rng.randint(16, 22)), fg, bg, pad=0.3)
        out.append(Fixture(_stored(_paste(b, lab, rng)), 1, [w], "small", photo=p))

        # blur: mid-size sign then the whole photo blurred
        p = next(photo_iter); b = _base(p)
        w = word(); fg, bg = _colors(rng)
        lab = _label(style(w), _font(FONTS[(i + 4) % len(FONTS)], rng.randint(34, 50)), fg, bg)
        img = _paste(b, lab, rng, rng.uniform(-8, 8)).filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5)))
        out.append(Fixture(_stored(img, quality=70), 1, [w], "blur", photo=p))

        # lowcontrast
        p = next(photo_iter); b = _base(p)
        w = word(); fg, bg = _colors(rng, "low")
        lab = _label(style(w), _font(FONTS[(i + 5) % len(FONTS)], rng.randint(36, 56)), fg, bg)
        out.append(Fixture(_stored(_paste(b, lab, rng)), 1, [w], "lowcontrast", photo=p))

        # notext: the photo as is (upscaled like the others)
        p = next(photo_iter)
        out.append(Fixture(_stored(_base(p)), 1, [], "notext", photo=p))
    return out


if __name__ == "__main__":
    import sys
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ocr_fixtures")
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(make_fixtures(2)):
        f.image.save(out_dir / f"{k:02d}_{f.kind}.jpg", exif=f.image.getexif())
        print(k, f.kind, f.orientation, f.words, f.decoy)
