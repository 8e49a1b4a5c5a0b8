"""Synthetic test videos with ground truth (tests and benchmarks/bench_video.py).

Each video is a sequence of scenes; every scene is one distinct photo shown with a slow Ken Burns
zoom and pan, joined by hard cuts (optionally one cross-dissolve). `write_video` returns the truth:
each scene's [start, end) in seconds and, with `querydir`, a JPEG of the upright frame at the
middle of the scene, rendered before encoding (an image query). PyAV encodes: H.264 (MP4, .mov,
.3gp, MPEG-TS), VP9 WebM, HEVC 10-bit MKV tagged HDR10, a portrait video stored landscape with a
display-matrix rotation (a phone held upright), a black intro, variable frame rate.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
from PIL import Image


@dataclass
class Scene:
    start_s: float
    end_s: float
    photo: str
    query: str = ""          # path of the upright mid-scene JPEG


@dataclass
class VideoTruth:
    path: str
    scenes: list = field(default_factory=list)   # list[Scene]
    broken: bool = False                          # expected to be rejected
    note: str = ""


def photos(folder, seed=0):
    """The photos of `folder` (.jpg), shuffled by `seed`."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".jpg"))
    random.Random(seed).shuffle(names)
    return [os.path.join(folder, n) for n in names]


class KenBurns:
    """Slow zoom + pan over one photo; frame(t in [0,1]) -> PIL RGB (w, h)."""

    def __init__(self, photo, w, h, rng):
        self.img = Image.open(photo).convert("RGB")
        self.w, self.h = w, h
        W, H = self.img.size
        ar = w / h
        # largest window with the output aspect inside the photo
        if W / H > ar:
            self.bw, self.bh = H * ar, H
        else:
            self.bw, self.bh = W, W / ar
        zin = rng.random() < 0.5
        self.z0, self.z1 = (1.0, 1.25) if zin else (1.25, 1.0)
        self.c0 = (rng.random(), rng.random())
        self.c1 = (rng.random(), rng.random())

    def frame(self, u):
        W, H = self.img.size
        z = self.z0 + (self.z1 - self.z0) * u
        cw, ch = self.bw / z, self.bh / z
        fx = self.c0[0] + (self.c1[0] - self.c0[0]) * u
        fy = self.c0[1] + (self.c1[1] - self.c0[1]) * u
        x0 = (W - cw) * fx
        y0 = (H - ch) * fy
        return self.img.resize((self.w, self.h), Image.BILINEAR,
                               box=(x0, y0, x0 + cw, y0 + ch))


def write_video(path, photos, durations, *, size=(640, 360), fps=25,
                codec="libx264", fmt=None, pix_fmt="yuv420p", options=None,
                rotation=0, black_intro_s=0.0, dissolve_at=None, dissolve_s=0.6,
                vfr=False, grain=0.0, seed=0, querydir=None, hdr=False,
                bit_rate=None):
    """Render and encode one video.  `size` is the DISPLAY (upright) size.

    rotation=90: pixels are stored rotated 90 deg clockwise (landscape coded
    frame) and the container carries a display matrix saying "rotate 90 deg
    counter-clockwise to display" -- what a phone held upright writes.
    Returns VideoTruth.
    """
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    w, h = size
    cw, ch = (h, w) if rotation in (90, -90, 270) else (w, h)
    out = av.open(path, "w", format=fmt)
    st = out.add_stream(codec, rate=fps, options=options or {})
    st.width, st.height, st.pix_fmt = cw, ch, pix_fmt
    if bit_rate:
        st.bit_rate = bit_rate
    if vfr:
        st.codec_context.time_base = Fraction(1, 1000)
    if hdr:
        cc = st.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace = 9, 16, 9  # bt2020/PQ
    if rotation:
        st.set_display_rotation(rotation)
    try:
        st.thread_count = 2
    except Exception:
        pass

    truth = VideoTruth(path=path)
    kbs = [KenBurns(p, w, h, rng) for p in photos]
    bounds, t = [], black_intro_s
    for d in durations:
        bounds.append((t, t + d))
        t += d
    total = t
    noise = None
    if grain:
        noise = [nprng.normal(0, grain, (h, w, 3)).astype(np.int16) for _ in range(7)]

    def render(tt):
        """Upright frame at time tt (seconds)."""
        if tt < black_intro_s:
            return Image.new("RGB", (w, h))
        for i, (a, b) in enumerate(bounds):
            if a <= tt < b or i == len(bounds) - 1:
                img = kbs[i].frame(min(1.0, (tt - a) / (b - a)))
                if dissolve_at is not None and i + 1 < len(bounds) and i == dissolve_at \
                        and tt > b - dissolve_s / 2:
                    nxt = kbs[i + 1].frame(0.0)
                    img = Image.blend(img, nxt, (tt - (b - dissolve_s / 2)) / dissolve_s)
                elif dissolve_at is not None and i == dissolve_at + 1 and tt < a + dissolve_s / 2:
                    prv = kbs[i - 1].frame(1.0)
                    img = Image.blend(prv, img, 0.5 + (tt - a) / dissolve_s)
                return img
        raise AssertionError

    # frame times: CFR, or VFR with jittered gaps (in ms)
    times, tt = [], 0.0
    while tt < total - 1e-9:
        times.append(tt)
        tt += (1.0 / fps) if not vfr else rng.choice([0.02, 0.04, 0.04, 0.066, 0.1])
    for k, tt in enumerate(times):
        img = render(tt)
        if noise is not None:
            a = np.asarray(img, dtype=np.int16) + noise[k % len(noise)]
            img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        if rotation in (90, -90, 270):
            # stored pixels = upright rotated clockwise by `rotation`
            img = img.rotate(-rotation, expand=True)
        frame = av.VideoFrame.from_image(img)
        if vfr:
            frame.pts = int(round(tt * 1000))
            frame.time_base = Fraction(1, 1000)
        else:
            frame.pts = k
        for pkt in st.encode(frame):
            out.mux(pkt)
    for pkt in st.encode():
        out.mux(pkt)
    out.close()

    base = os.path.basename(path).replace(".", "_")
    for i, ((a, b), p) in enumerate(zip(bounds, photos)):
        sc = Scene(start_s=round(a, 4), end_s=round(b, 4), photo=p)
        if querydir:
            sc.query = os.path.join(querydir, f"{base}_s{i}.jpg")
            kbs[i].frame(0.5).save(sc.query, quality=92)
        truth.scenes.append(sc)
    return truth


def truncate(src, dst, frac):
    """The first `frac` of a file's bytes (a copy cut short)."""
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * frac)])


def corrupt(src, dst, seed=1):
    """A copy whose middle third is random bytes."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    rng = random.Random(seed)
    a = len(data) // 3
    for i in range(a, a + len(data) // 3):
        data[i] = rng.randrange(256)
    with open(dst, "wb") as f:
        f.write(bytes(data))


def repeat_video(chunk, path, seconds, unique_s):
    """`path`: the packets of `chunk` (a video of `unique_s` seconds) muxed back to back until
    `seconds` (timestamps shifted): a long video at the cost of rendering a short one."""
    src = av.open(chunk)
    ist = src.streams.video[0]
    out = av.open(path, "w")
    ost = out.add_stream_from_template(ist)
    pk = [p for p in src.demux(ist) if p.size]
    step = int(round(unique_s / float(ist.time_base)))
    reps = int(math.ceil(seconds / unique_s))
    for r in range(reps):
        for p in pk:
            p.pts += step if r else 0
            p.dts += step if r else 0
            p.stream = ost
            out.mux(p)
    out.close()
    src.close()
    return reps
