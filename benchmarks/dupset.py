"""A near-duplicate test set built from real photos: originals with camera EXIF, edited copies of
each, bursts of one scene, and distinct photos (benchmarks/bench_duplicates.py, tests/test_duplicates.py).

`build(outdir, photos, n_edit, n_burst, n_distract, seed)` writes the files and returns the
manifest: [{path, kind, group (the true "same" cluster), scene (the true "similar" cluster), edit,
is_original}]. Originals are the source bytes with an EXIF block inserted (camera make/model and
a capture time with sub-seconds): nothing is re-encoded. Copies are made the way people make them:

* q40 (a messenger's re-compression), bright25 (+25% brightness), exifrot (pixels turned, EXIF
  orientation 6), overlay (a small text stamp): editors that keep the EXIF and add a Software tag;
* down55 (55% downscale), crop88 (centre 88%), rot4 (4-degree rotation, cropped to the largest
  inner rectangle), png (converted): web tools that drop the EXIF.

Bursts: 4 frames 0.5-2 s apart of one scene (a background photo) with a subject moving across it,
handheld (the frame drifts and jitters) or on a tripod, each frame a camera JPEG with its own
capture time. Distractors: other photos of the same collection (similar scenes: dogs, kids, beaches).
File modification times are shuffled, so no keeper rule can lean on them.
"""

from __future__ import annotations

import math
import os
import random
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFont

EDITS = ("q40", "down55", "crop88", "bright25", "rot4", "exifrot", "png", "overlay")
KEEP_EXIF = {"q40", "bright25", "exifrot", "overlay"}


def exif_block(when: float | None, camera: bool = True, software: str | None = None, orientation: int | None = None) -> bytes:
    ex = Image.Exif()
    if camera:
        ex[0x010F], ex[0x0110] = "Canon", "EOS 80D"
    if software:
        ex[0x0131] = software
    if orientation:
        ex[0x0112] = orientation
    if when is not None:
        t = datetime.fromtimestamp(when, timezone.utc)
        ifd = ex.get_ifd(0x8769)
        ifd[0x9003] = t.strftime("%Y:%m:%d %H:%M:%S")
        ifd[0x9291] = f"{round((when % 1) * 100):02d}"
    return ex.tobytes()


def insert_exif(jpeg: bytes, block: bytes) -> bytes:
    """The JPEG's bytes with an APP1 EXIF segment right after SOI (the image data untouched)."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xe1" + (len(block) + 2).to_bytes(2, "big") + block + jpeg[2:]


def make_edit(img: Image.Image, edit: str, rng: random.Random) -> tuple[Image.Image, str, dict]:
    w, h = img.size
    if edit == "q40":
        return img, "jpg", {"quality": 40}
    if edit == "down55":
        return img.resize((round(w * 0.55), round(h * 0.55)), Image.LANCZOS), "jpg", {"quality": 85}
    if edit == "crop88":
        cw, ch = round(w * 0.88), round(h * 0.88)
        left, top = (w - cw) // 2, (h - ch) // 2
        return img.crop((left, top, left + cw, top + ch)), "jpg", {"quality": 90}
    if edit == "bright25":
        return ImageEnhance.Brightness(img).enhance(1.25), "jpg", {"quality": 90}
    if edit == "rot4":
        a = math.radians(4)
        r = img.rotate(4 * rng.choice([-1, 1]), Image.BICUBIC, expand=False)
        s = 1.0 / (math.cos(a) + max(w / h, h / w) * math.sin(a))
        cw, ch = int(w * s), int(h * s)
        left, top = (w - cw) // 2, (h - ch) // 2
        return r.crop((left, top, left + cw, top + ch)), "jpg", {"quality": 90}
    if edit == "exifrot":
        return img.transpose(Image.ROTATE_90), "jpg", {"quality": 92}
    if edit == "png":
        return img, "png", {}
    if edit == "overlay":
        o = img.copy()
        d = ImageDraw.Draw(o)
        fs = max(10, h // 22)
        try:
            font = ImageFont.load_default(size=fs)
        except TypeError:
            font = ImageFont.load_default()
        x, y = w - fs * 8, h - fs * 2
        d.text((x + 1, y + 1), "(c) loupe 2024", fill=(0, 0, 0), font=font)
        d.text((x, y), "(c) loupe 2024", fill=(255, 255, 255), font=font)
        return o, "jpg", {"quality": 90}
    raise ValueError(edit)


def _subject(rng: random.Random, src: Path) -> Image.Image:
    s = Image.open(src).convert("RGB").resize((rng.randint(50, 80), rng.randint(60, 100)))
    m = Image.new("L", s.size, 0)
    ImageDraw.Draw(m).ellipse((0, 0, s.size[0] - 1, s.size[1] - 1), fill=255)
    s.putalpha(m)
    return s


def burst_frames(bg_src: Path, subject_src: Path, rng: random.Random, times=(0.0, 0.5, 1.0, 2.0)) -> tuple[list[Image.Image], bool]:
    """Frames of one scene at `times` (s): a subject crossing a background, handheld or tripod."""
    W, H = 320, 213
    bg = Image.open(bg_src).convert("RGB").resize((int(W * 1.2), int(H * 1.2)), Image.LANCZOS)
    tripod = rng.random() < 0.5
    sub = _subject(rng, subject_src)
    sx, sy = rng.randint(30, 120), rng.randint(40, 100)
    vx, vy = rng.choice([-1, 1]) * rng.uniform(40, 70), rng.uniform(-12, 12)
    if vx < 0:
        sx += 130
    dx, dy = rng.uniform(-8, 8), rng.uniform(-5, 5)
    frames = []
    for t in times:
        ox, oy = (W * 0.1, H * 0.1) if tripod else (W * 0.1 + dx * t + rng.uniform(-2, 2), H * 0.1 + dy * t + rng.uniform(-2, 2))
        fr = bg.crop((int(ox), int(oy), int(ox) + W, int(oy) + H))
        fr.paste(sub, (int(sx + vx * t), int(sy + vy * t)), sub)
        frames.append(fr)
    return frames, tripod


def build(outdir: str | os.PathLike, photos: str | os.PathLike, n_edit: int = 60, n_burst: int = 30, n_distract: int = 200,
          seed: int = 0, edits=EDITS) -> list[dict]:
    rng = random.Random(seed)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(photos).iterdir())
    pick = rng.sample(files, min(len(files), n_edit + n_burst + n_distract))
    e_files, b_files, d_files = pick[:n_edit], pick[n_edit : n_edit + n_burst], pick[n_edit + n_burst :]
    man: list[dict] = []
    base_t = 1.7e9
    gid = 0
    for i, src in enumerate(e_files):
        when = base_t + i * 3600.0 + 0.25
        dst = out / f"{src.stem}__orig.jpg"
        dst.write_bytes(insert_exif(src.read_bytes(), exif_block(when)))
        man.append(dict(path=str(dst), kind="edit", group=gid, scene=gid, edit="orig", is_original=True))
        img = Image.open(src).convert("RGB")
        for e in edits:
            im, ext, kw = make_edit(img, e, rng)
            p = out / f"{src.stem}__{e}.{ext}"
            if e in KEEP_EXIF:
                kw["exif"] = exif_block(when, software="PhotoEditor 3.1", orientation=6 if e == "exifrot" else None)
            im.save(p, "JPEG" if ext == "jpg" else "PNG", **kw)
            man.append(dict(path=str(p), kind="edit", group=gid, scene=gid, edit=e, is_original=False))
        gid += 1
    for i, src in enumerate(b_files):
        times = (0.0, 0.5, 1.0, 2.0) if rng.random() < 0.5 else (0.0, 0.5, 1.5, 2.4)
        frames, tripod = burst_frames(src, rng.choice(files), rng, times)
        t0 = base_t + 1e6 + i * 3600.0
        scene = gid
        for t, fr in zip(times, frames):
            p = out / f"{src.stem}__burst_t{int(t * 1000):04d}.jpg"
            fr.save(p, "JPEG", quality=92, exif=exif_block(t0 + t))
            man.append(dict(path=str(p), kind="burst", group=gid, scene=scene, edit="tripod" if tripod else "handheld", is_original=True))
            gid += 1
    for i, src in enumerate(d_files):
        dst = out / f"{src.stem}__d.jpg"
        dst.write_bytes(insert_exif(src.read_bytes(), exif_block(base_t + 2e6 + i * 3600.0)))
        man.append(dict(path=str(dst), kind="distract", group=gid, scene=gid, edit="orig", is_original=True))
        gid += 1
    mtimes = [base_t + 3e6 + k * 60.0 for k in range(len(man))]
    rng.shuffle(mtimes)  # no keeper rule may lean on file dates
    for row, mt in zip(man, mtimes):
        os.utime(row["path"], (mt, mt))
    return man


def pair_scores(manifest: list[dict], groups: list[dict]) -> dict:
    """Pairwise precision/recall of both tiers against the manifest, recall per edit kind, keeper accuracy, burst leakage.

    `groups`: `loupe duplicates --json` objects (tier, paths, keep)."""
    import itertools

    row = {m["path"]: m for m in manifest}
    got = {"same": set(), "similar": set()}
    for g in groups:
        paths = sorted(p for p in g["paths"] if p in row)
        for a, b in itertools.combinations(paths, 2):
            got[g["tier"]].add((a, b))
    truth_same, truth_sim = set(), set()
    for a, b in itertools.combinations(sorted(row), 2):
        if row[a]["group"] == row[b]["group"]:
            truth_same.add((a, b))
        elif row[a]["scene"] == row[b]["scene"]:
            truth_sim.add((a, b))
    # a "similar" group also holds its same-photo pairs: score similar on cross-group pairs only
    sim_pairs = {(a, b) for a, b in got["similar"] if row[a]["group"] != row[b]["group"]}
    out = {}
    for tier, found, truth in (("same", got["same"], truth_same), ("similar", sim_pairs, truth_sim)):
        tp = len(found & truth)
        out[tier] = {"precision": tp / len(found) if found else 1.0, "recall": tp / len(truth) if truth else 1.0,
                     "pairs": len(found), "true_pairs": len(truth)}
    per_edit = {}
    origs = {m["group"]: m["path"] for m in manifest if m["kind"] == "edit" and m["edit"] == "orig"}
    for m in manifest:
        if m["kind"] == "edit" and m["edit"] != "orig":
            key = tuple(sorted((origs[m["group"]], m["path"])))
            per_edit.setdefault(m["edit"], []).append(key in got["same"])
    out["recall_per_edit"] = {e: sum(v) / len(v) for e, v in sorted(per_edit.items())}
    out["burst_pairs_in_same"] = sum(1 for a, b in got["same"] if row[a]["kind"] == "burst" and row[a]["group"] != row[b]["group"])
    kept = [row[g["keep"]]["edit"] == "orig" for g in groups if g["tier"] == "same"
            and any(row.get(p, {}).get("kind") == "edit" for p in g["paths"])]
    out["keeper_accuracy"] = sum(kept) / len(kept) if kept else 1.0
    out["keeper_groups"] = len(kept)
    return out
