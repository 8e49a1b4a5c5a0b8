"""The near-duplicate signal: what finding copies of one photo (and bursts of one scene) needs,
in under 1 KB per photo, computed from the pixels alone (no model weights involved).

`NearDuplicate.extract` returns the stored bytes (layout below); `parse` reads them back;
`compare` verifies one candidate pair and says which tier it belongs to ("same": one picture
in two files; "similar": one scene moments apart; None). Grouping many photos (candidates from an
index, verification only on candidates) is `loupe.retrieval.engine.duplicates`.

Layout, version 1 (little endian), 297 + 34*n bytes, n <= 20 keypoints (so <= 977 B):
  off  size  field
  0    1     u8   version (= 1)
  1    1     u8   n, the number of ORB keypoints (0..20)
  2    2     u16  aspect = round(1000 * w / h) of the picture as shown (EXIF orientation applied)
  4    2     f16  sharpness: variance of the Laplacian of the 256-px grey picture
  6    2     u16  clip = 1e4 * the fraction of grey pixels >= 250 (blown highlights)
  8    8     u64  pHash of the full frame (32x32 DCT, low 8x8 > median)
  16   8     u64  pHash of the centre 88% (so a cropped copy lands near its original in the index)
  24   8     f64  capture time from EXIF (seconds, with SubSecTimeOriginal), NaN when unknown
  32   1     u8   flags: 1 camera make/model in EXIF, 2 an editing Software tag, 4 EXIF orientation != 1
  33   256   u8   16x16 grey thumbnail of the full frame (area averaged, aspect ignored)
  289  8     -    reserved (zero)
  297  2n    u8   keypoint (x, y) quantised to 0..255 across the width / height
  297+2n 32n u8   ORB descriptors (256 bits each), strongest first, spread out over the frame

Everything is measured on a grey picture whose long side is 256 px, after EXIF rotation: an
EXIF-rotated copy has the same signal as its original. Why each part is there and the thresholds
of `compare` are measured in benchmarks/bench_duplicates.py (docs/DUPLICATES.md).
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from loupe.indexer.signals.base import Signal, SourceFile

VERSION = 1
N_KP = 20
SIDE = 256
HEADER = struct.Struct("<BBHeHQQdB")  # 33 bytes
THUMB_AT, THUMB = HEADER.size, 16
KP_AT = THUMB_AT + THUMB * THUMB + 8
CAMERA, SOFTWARE, ORIENTED = 1, 2, 4
_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

# verification thresholds (measured: benchmarks/bench_duplicates.py, docs/DUPLICATES.md)
SAME_TIME_TOL = 0.3  # s: two capture times further apart cannot be one picture
SIM_TIME_WIN = 120.0  # s: "similar" needs capture times this close (when both are known)
SIM_HAM_NO_GEOM = 14  # "similar" without ORB geometry needs pHashes this close
MIN_INLIERS = 6
BAD_CELL = 16.0
SAME_RESID = 5.0
SAME_BAD = 0.04
CONTAIN_TOL = 0.03
_ORB = None


def _cv2():
    import cv2

    return cv2


def _orb():
    global _ORB
    if _ORB is None:
        cv2 = _cv2()
        _ORB = cv2.ORB_create(nfeatures=200, scaleFactor=1.3, nlevels=4, edgeThreshold=15, patchSize=31, fastThreshold=12)
    return _ORB


def _phash(cv2, g: np.ndarray) -> int:
    s = cv2.resize(g, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    d = cv2.dct(s)[:8, :8].ravel()
    return int(np.packbits(d > np.median(d)).view(">u8")[0])


def _spread(points: np.ndarray, response: np.ndarray, n: int, min_d: float) -> list[int]:
    """The strongest keypoints, at least `min_d` apart (greedy non-maximum suppression)."""
    chosen: list[int] = []
    for i in np.argsort(-response):
        if all(((points[i] - points[j]) ** 2).sum() >= min_d * min_d for j in chosen):
            chosen.append(int(i))
            if len(chosen) == n:
                break
    return chosen


def exif_facts(data: bytes) -> tuple[float, int]:
    """(capture time in seconds with its sub-second part, or NaN; flags) from a file's EXIF."""
    from PIL import Image

    when, flags = math.nan, 0
    try:
        with Image.open(io.BytesIO(data)) as img:
            exif = img.getexif()
            if not exif:
                return when, flags
            sub = exif.get_ifd(0x8769)
            if exif.get(0x010F) or exif.get(0x0110):
                flags |= CAMERA
            if exif.get(0x0131):
                flags |= SOFTWARE
            if exif.get(0x0112, 1) not in (0, 1):
                flags |= ORIENTED
            raw = sub.get(0x9003) or exif.get(0x0132)
            if isinstance(raw, bytes):
                raw = raw.decode("ascii", "ignore")
            if isinstance(raw, str):
                t = datetime.strptime(raw.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc)
                frac = str(sub.get(0x9291) or "").strip().rstrip("\x00")
                when = t.timestamp() + (float("0." + frac) if frac.isdigit() else 0.0)
    except Exception:  # noqa: BLE001 - no readable EXIF: no time, no flags
        pass
    return when, flags


def extract_signal(image, data: bytes = b"") -> bytes:
    """The signal of an RGB PIL picture (EXIF rotation applied); `data`, the file's bytes, for its EXIF."""
    cv2 = _cv2()
    g = np.asarray(image.convert("L"))
    h, w = g.shape
    aspect = min(65535, round(1000 * w / h))
    scale = SIDE / max(w, h)
    if scale < 1:
        g = cv2.resize(g, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    h, w = g.shape
    ph = _phash(cv2, g)
    cy, cx = round(h * 0.06), round(w * 0.06)
    ph88 = _phash(cv2, g[cy : h - cy, cx : w - cx])
    thumb = cv2.resize(g, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    sharp = float(cv2.Laplacian(g, cv2.CV_32F).var())
    clip = int(min(65535, 1e4 * float((g >= 250).mean())))
    kps, des = _orb().detectAndCompute(g, None)
    if des is None or not kps:
        xy, des = np.zeros((0, 2), np.uint8), np.zeros((0, 32), np.uint8)
    else:
        pts = np.array([k.pt for k in kps], np.float32)
        chosen = _spread(pts, np.array([k.response for k in kps]), N_KP, max(w, h) / 14)
        xy = np.minimum(255, np.round(pts[chosen] / np.array([w, h], np.float32) * 256)).astype(np.uint8).reshape(-1, 2)
        des = des[chosen]
    when, flags = exif_facts(data) if data else (math.nan, 0)
    header = HEADER.pack(VERSION, len(xy), aspect, min(sharp, 65000.0), clip, ph, ph88, when, flags)
    return header + thumb.tobytes() + bytes(8) + xy.tobytes() + des.tobytes()


@dataclass
class Parsed:
    aspect: float
    sharp: float
    clip: float
    ph: int
    ph88: int
    time: float  # NaN: unknown
    flags: int
    thumb: np.ndarray  # 16x16 float32
    pts: np.ndarray  # n x 2, in units where the long side is 1
    des: np.ndarray  # n x 32 uint8


def parse(sig: bytes) -> Parsed:
    v, n, aspect, sharp, clip, ph, ph88, when, flags = HEADER.unpack_from(sig, 0)
    if v != VERSION:
        raise ValueError(f"near-duplicate signal version {v}, expected {VERSION}")
    aspect = aspect / 1000.0
    thumb = np.frombuffer(sig, np.uint8, THUMB * THUMB, THUMB_AT).reshape(THUMB, THUMB).astype(np.float32)
    xy = np.frombuffer(sig, np.uint8, 2 * n, KP_AT).reshape(n, 2).astype(np.float32) + 0.5
    des = np.frombuffer(sig, np.uint8, 32 * n, KP_AT + 2 * n).reshape(n, 32)
    width, height = _dims(aspect)
    return Parsed(aspect, float(sharp), clip / 1e4, ph, ph88, when, flags, thumb, xy / 256.0 * np.array([width, height], np.float32), des)


def headers(sigs: list[bytes]) -> np.ndarray:
    """The fixed headers of many signals at once, as a numpy record array (no per-signal parsing)."""
    dt = np.dtype([("v", "u1"), ("n", "u1"), ("aspect", "<u2"), ("sharp", "<f2"), ("clip", "<u2"), ("ph", "<u8"),
                   ("ph88", "<u8"), ("time", "<f8"), ("flags", "u1")])
    assert dt.itemsize == HEADER.size
    return np.frombuffer(b"".join(s[: HEADER.size] for s in sigs), dtype=dt)


@dataclass
class Match:
    """The verdict on one pair: `tier` ("same", "similar" or None) and what it rests on."""

    tier: str | None
    ham: int = 64  # smallest pHash distance over (full, centre) combinations
    inliers: int = 0  # ORB matches consistent with one similarity transform
    resid: float = 99.0  # mean abs residual of the aligned thumbnails after tone matching (0..255)
    bad: float = 1.0  # fraction of cells whose residual is > BAD_CELL
    contain: int = 0  # 2: the same frame, 1: b inside a, -1: a inside b, 0: neither
    scale: float = 1.0  # linear size of b's field of view relative to a's


def _dims(aspect: float) -> tuple[float, float]:
    return (1.0, 1.0 / aspect) if aspect >= 1 else (aspect, 1.0)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _transform(cv2, pa: Parsed, pb: Parsed):
    """A similarity transform from b's units to a's fitted on mutual-nearest ORB matches (RANSAC), and its inliers."""
    if len(pa.des) < 4 or len(pb.des) < 4:
        return None, 0
    d = _POP8[np.bitwise_xor(pa.des[:, None, :], pb.des[None, :, :])].sum(-1, dtype=np.int32)
    ab, ba = d.argmin(1), d.argmin(0)
    ia = np.arange(len(ab))
    ok = (ba[ab] == ia) & (d[ia, ab] <= 64)
    if ok.sum() < 4:
        return None, int(ok.sum())
    M, inl = cv2.estimateAffinePartial2D(pb.pts[ab[ok]], pa.pts[ia[ok]], method=cv2.RANSAC, ransacReprojThreshold=0.015,
                                         maxIters=200, confidence=0.99, refineIters=10)
    if M is None:
        return None, 0
    n = int(inl.sum())
    return (M if n >= 4 else None), n


def _residual(cv2, pa: Parsed, pb: Parsed, M) -> tuple[float, float]:
    """Warp b's thumbnail into a's frame; (mean residual, fraction of bad cells) on the overlap after
    a monotone tone matching (brightness, contrast, gamma, clipping: all harmless)."""
    wa, ha = _dims(pa.aspect)
    wb, hb = _dims(pb.aspect)
    T = (np.array([[THUMB / wa, 0, 0], [0, THUMB / ha, 0], [0, 0, 1]]) @ np.vstack([M, [0, 0, 1]])
         @ np.array([[wb / THUMB, 0, 0], [0, hb / THUMB, 0], [0, 0, 1]]))[:2]
    warped = cv2.warpAffine(pb.thumb, T, (THUMB, THUMB), flags=cv2.INTER_LINEAR, borderValue=-1)
    cover = cv2.warpAffine(np.ones((THUMB, THUMB), np.float32), T, (THUMB, THUMB), flags=cv2.INTER_LINEAR, borderValue=0)
    m = cover > 0.999
    if m.sum() < 40:
        return 99.0, 1.0
    ya = cv2.GaussianBlur(pa.thumb, (3, 3), 0.8)  # the two thumbnails were area-sampled on different grids
    wbl = cv2.GaussianBlur(np.where(m, warped, 0).astype(np.float32), (3, 3), 0.8)
    wn = cv2.GaussianBlur(m.astype(np.float32), (3, 3), 0.8)
    m2 = m & (wn > 0.99)
    if m2.sum() < 40:
        m2 = m
    x = wbl[m2] / np.maximum(wn[m2], 1e-3)
    y = ya[m2]
    xs = np.empty_like(x)
    xs[np.argsort(x, kind="stable")] = np.sort(y)  # quantile matching
    r = np.abs(y - xs)
    return float(r.mean()), float((r > BAD_CELL).mean())


def _containment(cv2, pa: Parsed, pb: Parsed, M) -> int:
    wa, ha = _dims(pa.aspect)
    wb, hb = _dims(pb.aspect)
    t = CONTAIN_TOL

    def inside(corners, width, height):
        return bool(np.all((corners[:, 0] >= -t * width) & (corners[:, 0] <= width * (1 + t))
                           & (corners[:, 1] >= -t * height) & (corners[:, 1] <= height * (1 + t))))

    b_in_a = inside((M @ np.array([[0, 0, 1], [wb, 0, 1], [0, hb, 1], [wb, hb, 1]]).T).T, wa, ha)
    a_in_b = inside((cv2.invertAffineTransform(M) @ np.array([[0, 0, 1], [wa, 0, 1], [0, ha, 1], [wa, ha, 1]]).T).T, wb, hb)
    return 2 if (b_in_a and a_in_b) else 1 if b_in_a else -1 if a_in_b else 0


def compare(pa: Parsed, pb: Parsed, ta: float = math.nan, tb: float = math.nan) -> Match:
    """Verify one candidate pair. `ta`/`tb`: capture times (NaN: unknown) when known better than the signals'.

    "same": one field of view holds the other (a crop, a rotation with crop, a resize) and the
    aligned pixels agree after tone matching, with capture times (when both known) <= 0.3 s apart.
    "similar": the ORB geometry holds (or, with little texture, an aligned thumbnail fits) but the pixels or the times rule
    out "same", with capture times (when both known) <= 120 s apart."""
    cv2 = _cv2()
    ta = pa.time if math.isnan(ta) else ta
    tb = pb.time if math.isnan(tb) else tb
    ham = min(hamming(pa.ph, pb.ph), hamming(pa.ph, pb.ph88), hamming(pa.ph88, pb.ph))
    dt = None if (math.isnan(ta) or math.isnan(tb)) else abs(ta - tb)
    M, inliers = _transform(cv2, pa, pb)
    hyps = [M] if (M is not None and inliers >= MIN_INLIERS) else []
    wa, ha = _dims(pa.aspect)
    wb, hb = _dims(pb.aspect)
    if not hyps and ham <= SIM_HAM_NO_GEOM:  # low texture: identity and centred-crop hypotheses
        s = min(wa / wb, ha / hb)
        for f in (1.0, 0.88, 1 / 0.88):
            ss = s * f
            hyps.append(np.array([[ss, 0, (wa - ss * wb) / 2], [0, ss, (ha - ss * hb) / 2]]))
    best = Match(None, ham, inliers)
    for H in hyps:
        resid, bad = _residual(cv2, pa, pb, H)
        if resid < best.resid:
            best.resid, best.bad = resid, bad
            best.contain = _containment(cv2, pa, pb, H)
            best.scale = float(math.sqrt(abs(np.linalg.det(H[:, :2]))) * max(wb, hb) / max(wa, ha))
    geom = inliers >= MIN_INLIERS or (bool(hyps) and best.resid < 2 * SAME_RESID)
    pixels_same = best.contain != 0 and best.resid <= SAME_RESID and best.bad <= SAME_BAD
    if pixels_same and (dt is None or dt <= SAME_TIME_TOL):
        best.tier = "same"
    elif geom and (dt is None or dt <= SIM_TIME_WIN):
        best.tier = "similar"
    return best


class NearDuplicate(Signal):
    """Perceptual hashes, a thumbnail, ORB keypoints, sharpness and EXIF facts (see the module doc)."""

    name = "neardup"
    version = VERSION
    min_side = 256

    def extract(self, image, source: SourceFile) -> bytes:
        return extract_signal(image, source.data)

    def distance(self, a: bytes, b: bytes) -> float:
        """pHash distance (0..64) over the full frame and the centre crop; `compare` says the tier."""
        pa, pb = HEADER.unpack_from(a, 0), HEADER.unpack_from(b, 0)
        return float(min(hamming(pa[5], pb[5]), hamming(pa[5], pb[6]), hamming(pa[6], pb[5])))
