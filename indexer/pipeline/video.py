"""Video moments: cheap scene segmentation and representative frames, with PyAV (FFmpeg in its wheels).

    info = probe(path)                       # VideoInfo(duration_s, fps, width, height, rotation, codec, ...)
    for m in moments(path, max_gap_s=10, time_limit_s=120):
        m.start_s, m.time_s, m.end_s, m.image   # image: PIL RGB, upright (display rotation applied)

Failures raise a `VideoError` (a `BadImage`, so every batch skips the file with its reason) whose
str() is a one-line reason: `CorruptVideo` (cannot be opened, demuxed or decoded; truncated; no
frames), `UnsupportedVideo` (no video stream), `VideoTimeout` (the per-file wall-clock budget,
checked per packet; I/O stalls are bounded by PyAV's interrupt-callback `timeout`).
`moments` is a generator: an error can come after some moments were yielded, so callers commit a
file's moments only once the iterator has finished cleanly.

Single pass, no seeking: frames are decoded once (frame-threaded, `skip_frame="NONREF"`:
non-reference B frames are not decoded at all). Every decoded frame is scaled by swscale straight
to a 64x36 grey thumbnail; every `cand_step_s` the current frame is also converted to RGB (short
side `image_size`) as a candidate representative of the running segment.

Segmentation rule (on the 64x36 grey frame, 0..1), measured in docs/VIDEO.md:
  d      = mean |g_t - g_prev|, drift = mean |g_t - g_segment_start|
  a segment ends at frame t on
    * a hard cut:  d > CUT_ABS (0.10) and d > CUT_RATIO (3) x median of the last 15 d values,
    * drift:       drift > DRIFT_ABS (0.20) (dissolves, fades, pans), or
    * a gap:       the segment is max_gap_s long (N = 10 s),
  never before MIN_SCENE_S (0.4 s) (flashes).
Representative: among the candidates, drop blank ones (grey mean < 0.07 or > 0.95, or std <
0.025) and blurred ones (Laplacian variance < 35% of the sharpest); take the one nearest the
middle. A segment with only blank candidates yields nothing (black intros, fades to black).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import av
import numpy as np
from PIL import Image

from loupe.indexer.pipeline.imageio import BadImage

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts"})

# thresholds (see module docstring; measured in FINDINGS.md)
GREY_W, GREY_H = 64, 36
CUT_ABS = 0.10
CUT_RATIO = 3.0
CUT_HISTORY = 15
DRIFT_ABS = 0.20
MIN_SCENE_S = 0.4
BLANK_DARK, BLANK_BRIGHT, BLANK_STD = 0.07, 0.95, 0.025
BLUR_REL = 0.35


class VideoError(BadImage):
    """A video that cannot be indexed; str(e) is the one-line skip reason."""


class CorruptVideo(VideoError):
    pass


class UnsupportedVideo(VideoError):
    pass


class VideoTimeout(VideoError):
    pass


@dataclass
class VideoInfo:
    duration_s: float
    fps: float                 # average rate (nominal for VFR)
    width: int                 # display (upright) size
    height: int
    rotation: int              # degrees counter-clockwise applied for display (0/90/180/-90)
    codec: str
    pix_fmt: str
    bit_depth: int
    hdr: bool                  # PQ or HLG transfer
    container: str
    coded_width: int
    coded_height: int


@dataclass
class Moment:
    start_s: float
    time_s: float              # time of the representative frame
    end_s: float
    image: Image.Image         # RGB, upright
    reason: str = "cut"        # why the segment started: start | cut | drift | gap


def _one_line(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s[:300]


# A stalled read (a vanished network drive) ends after IO_TIMEOUT_S; never sooner than MIN_IO_TIMEOUT_S,
# which a healthy disk always meets: a tight wall-clock budget is checked per packet, not by FFmpeg's
# interrupt callback (which aborts even the open of a healthy file when given a budget of microseconds).
IO_TIMEOUT_S, MIN_IO_TIMEOUT_S = 30.0, 2.0


def _open(path, timeout_s):
    """`path`, or an open binary file (the web server's, opened once and checked)."""
    if isinstance(path, (str, os.PathLike)):
        if not os.path.isfile(path):
            raise CorruptVideo(f"not a file: {path}")
        if os.path.getsize(path) == 0:
            raise CorruptVideo("empty file")
    try:
        c = av.open(path, timeout=(timeout_s, timeout_s))
    except av.error.ExitError:  # the interrupt callback fired: reading stalled past the I/O timeout
        raise VideoTimeout(f"opening stalled for more than {timeout_s:g}s") from None
    except av.error.FFmpegError as e:  # the reason is kept beside the path: not the path again
        raise CorruptVideo(f"cannot open: {_one_line(e).replace(f': {str(path)!r}', '')}") from None
    except Exception as e:  # pragma: no cover - unexpected
        raise CorruptVideo(f"cannot open: {_one_line(e)}") from None
    if not c.streams.video:
        c.close()
        raise UnsupportedVideo("no video stream")
    # prefer a real video stream over cover art
    vs = [s for s in c.streams.video
          if not (s.disposition & getattr(av.stream.Disposition, "attached_pic", 1024))]
    if not vs:
        c.close()
        raise UnsupportedVideo("only attached pictures (cover art), no video")
    st = vs[0]
    if st.codec_context is None:
        c.close()
        raise UnsupportedVideo(f"no decoder for codec id {st.codec_context}")
    return c, st


def _stream_duration(c, st):
    if st.duration and st.time_base:
        return float(st.duration * st.time_base)
    if c.duration:
        return c.duration / 1e6
    return float("nan")


def _bit_depth(fmt_name: str) -> int:
    for d in (16, 14, 12, 10, 9):
        if f"p{d}" in fmt_name or f"{d}le" in fmt_name or f"{d}be" in fmt_name:
            return d
    return 8


def probe(path, *, time_limit_s: float = 10.0) -> VideoInfo:
    """Container/stream facts plus the display rotation (read from the first
    decoded frame's display-matrix side data, which FFmpeg fills from the
    container's tkhd matrix / 'rotate' tag)."""
    c, st = _open(path, time_limit_s)
    try:
        cc = st.codec_context
        cc.thread_type = "AUTO"
        rotation, first = 0, None
        t_end = time.monotonic() + time_limit_s
        try:
            for pkt in c.demux(st):
                for f in pkt.decode():
                    first = f
                    break
                if first is not None or time.monotonic() > t_end:
                    break
        except av.error.FFmpegError as e:
            raise CorruptVideo(f"cannot decode first frame: {_one_line(e)}") from None
        if first is None:
            raise CorruptVideo("no decodable frame")
        rotation = int(round(first.rotation or 0))
        cw, ch = first.width, first.height
        sar = st.sample_aspect_ratio
        dw = int(round(cw * float(sar))) if sar and float(sar) > 0 else cw
        w, h = (ch, dw) if abs(rotation) == 90 else (dw, ch)
        rate = st.average_rate or st.guessed_rate or st.base_rate
        fmt = first.format.name
        trc = getattr(first, "color_trc", None)
        return VideoInfo(
            duration_s=_stream_duration(c, st), fps=float(rate) if rate else float("nan"),
            width=w, height=h, rotation=rotation, codec=cc.name, pix_fmt=fmt,
            bit_depth=_bit_depth(fmt), hdr=trc in (16, 18), container=c.format.name,
            coded_width=cw, coded_height=ch)
    finally:
        c.close()


# ---------------------------------------------------------------- helpers

def _upright(arr: np.ndarray, rotation: int) -> np.ndarray:
    r = rotation % 360
    if r == 90:
        return np.rot90(arr, 1)     # counter-clockwise
    if r == 180:
        return np.rot90(arr, 2)
    if r == 270:
        return np.rot90(arr, -1)
    return arr


def _sharpness(grey: np.ndarray) -> float:
    g = grey.astype(np.float32)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def _pq_to_sdr(rgb: np.ndarray) -> np.ndarray:
    """Very small HDR10 (PQ, BT.2020) -> SDR sRGB tone map for thumbnails.
    (HLG is left as is: it is roughly SDR-compatible.)"""
    e = rgb.astype(np.float32) / 255.0
    m1, m2, c1, c2, c3 = 0.1593017578125, 78.84375, 0.8359375, 18.8515625, 18.6875
    ep = np.power(np.clip(e, 0, 1), 1 / m2)
    lin = np.power(np.maximum(ep - c1, 0) / (c2 - c3 * ep), 1 / m1) * 10000.0  # nits
    lin = lin / 203.0                                  # reference white -> 1.0
    m = np.array([[1.6605, -0.5876, -0.0728],
                  [-0.1246, 1.1329, -0.0083],
                  [-0.0182, -0.1006, 1.1187]], np.float32)  # BT.2020 -> BT.709
    lin = np.clip(lin @ m.T, 0, None)
    lin = lin * (1 + lin / 4.0) / (1 + lin)            # extended Reinhard, white=2
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.power(lin, 1 / 2.4) - 0.055)
    return np.clip(srgb * 255 + 0.5, 0, 255).astype(np.uint8)


@dataclass
class _Cand:
    t: float
    rgb: np.ndarray
    blank: bool
    sharp: float


def _pick(cands, start, end):
    ok = [c for c in cands if not c.blank]
    if not ok:
        return None
    best = max(c.sharp for c in ok)
    ok = [c for c in ok if c.sharp >= BLUR_REL * best] or ok
    mid = 0.5 * (start + end)
    return min(ok, key=lambda c: abs(c.t - mid))


# ---------------------------------------------------------------- main

def moments(path, *, max_gap_s: float = 10.0, time_limit_s: Optional[float] = 300.0,
            image_size: int = 384, skip_frame: str = "NONREF",
            cand_step_s: Optional[float] = None, tonemap: bool = True,
            stats: Optional[dict] = None) -> Iterator[Moment]:
    """Yield Moment(start_s, time_s, end_s, image) in time order.

    max_gap_s:    N -- at least one moment per N seconds inside long scenes.
    time_limit_s: wall-clock budget for the whole file (VideoTimeout).
    image_size:   short side of the returned images (never upscaled).
    skip_frame:   "NONREF" (default), "DEFAULT" (decode all) or "NONKEY".
    stats:        optional dict filled with counters (frames, diffs, errors...).
    """
    t_start = time.monotonic()
    deadline = t_start + time_limit_s if time_limit_s else math.inf
    io_timeout = IO_TIMEOUT_S if not time_limit_s else min(IO_TIMEOUT_S, max(MIN_IO_TIMEOUT_S, time_limit_s))
    c, st = _open(path, io_timeout)
    cc = st.codec_context
    cc.thread_type = "AUTO"
    if skip_frame and skip_frame != "DEFAULT":
        cc.skip_frame = skip_frame
    tb = st.time_base
    t0 = float(st.start_time * tb) if (st.start_time is not None and tb) else None
    duration = _stream_duration(c, st)
    rate = st.average_rate or st.guessed_rate
    fdur = 1.0 / float(rate) if rate else 1 / 30.0
    step = cand_step_s or min(0.5, max_gap_s / 6.0)
    sar = st.sample_aspect_ratio
    sar = float(sar) if sar and float(sar) > 0 else 1.0

    S = stats if stats is not None else {}
    S.update(frames=0, errors=0, packets=0, cuts=0, drifts=0, gaps=0)

    # running segment state
    seg_start = None
    seg_reason = "start"
    anchor = prev = None
    hist: list = []
    cands: list = []
    next_cand = 0.0
    last_t = None
    rotation = None
    geom = None  # (thumb_w, thumb_h)

    def close(end_t):
        ch = _pick(cands, seg_start, end_t)
        if ch is None:
            return None
        img = _upright(ch.rgb, rotation or 0)
        return Moment(round(seg_start, 3), round(ch.t, 3), round(end_t, 3),
                      Image.fromarray(np.ascontiguousarray(img)), seg_reason)

    try:
        demux = c.demux(st)
        while True:
            if time.monotonic() > deadline:
                raise VideoTimeout(f"time limit {time_limit_s:.0f}s exceeded at "
                                   f"{(last_t or 0):.1f}s of {duration:.1f}s")
            try:
                pkt = next(demux)
            except StopIteration:
                break
            except av.error.FFmpegError as e:
                S["errors"] += 1
                if S["frames"] == 0:
                    raise CorruptVideo(f"demux error before first frame: {_one_line(e)}") from None
                raise CorruptVideo(f"demux error at {(last_t or 0):.1f}s: {_one_line(e)}") from None
            S["packets"] += 1
            try:
                frames = pkt.decode()
            except av.error.FFmpegError as e:
                S["errors"] += 1
                if S["errors"] > 10 + 0.02 * S["packets"]:
                    raise CorruptVideo(f"too many decode errors ({S['errors']}), "
                                       f"last at {(last_t or 0):.1f}s: {_one_line(e)}") from None
                continue
            for f in frames:
                if f.time is not None:
                    t = float(f.time)
                    if t0 is None:
                        t0 = t
                    t -= t0
                else:
                    t = (last_t + fdur) if last_t is not None else 0.0
                if f.is_corrupt:
                    S["corrupt_frames"] = S.get("corrupt_frames", 0) + 1
                if last_t is not None and t - last_t > max(1.0, 12 * fdur):
                    S["lost_s"] = S.get("lost_s", 0.0) + (t - last_t)   # data hole
                if last_t is not None and t <= last_t - 1.0:
                    # timestamp reset / garbage: keep monotonic
                    t = last_t + fdur
                S["frames"] += 1
                if rotation is None:
                    rotation = int(round(f.rotation or 0))
                    w, h = f.width * sar, f.height
                    sc = min(1.0, image_size / min(w, h))
                    geom = (max(2, int(round(w * sc / 2)) * 2), max(2, int(round(h * sc / 2)) * 2))
                    S["hdr"] = getattr(f, "color_trc", None) == 16
                g = f.reformat(width=GREY_W, height=GREY_H, format="gray",
                               interpolation="AREA").to_ndarray().astype(np.float32) * (1 / 255.0)
                if seg_start is None:
                    seg_start, anchor, next_cand = t, g, t
                else:
                    d = float(np.abs(g - prev).mean())
                    seg_len = t - seg_start
                    why = None
                    med = float(np.median(hist)) if hist else 0.0
                    if d > CUT_ABS and d > CUT_RATIO * med and (
                            seg_len >= MIN_SCENE_S or seg_reason in ("drift", "gap")):
                        why = "cut"     # a hard cut may always end a drift/gap segment
                    elif seg_len >= MIN_SCENE_S and float(np.abs(g - anchor).mean()) > DRIFT_ABS:
                        why = "drift"
                    if why is None and seg_len >= max_gap_s:
                        why = "gap"
                    if why:
                        S[why + "s"] += 1
                        # a drift/gap stub cut short by a hard cut adds nothing new
                        m = None if (seg_len < MIN_SCENE_S and seg_reason in ("drift", "gap")) \
                            else close(t)
                        if m is not None:
                            yield m
                        seg_start, seg_reason, anchor, cands, next_cand = t, why, g, [], t
                        hist = []
                    if why != "cut":
                        hist.append(d)
                        if len(hist) > CUT_HISTORY:
                            hist.pop(0)
                prev = g
                if t >= next_cand:
                    rgb = f.reformat(width=geom[0], height=geom[1], format="rgb24",
                                     interpolation="BILINEAR").to_ndarray()
                    if S.get("hdr") and tonemap:
                        rgb = _pq_to_sdr(rgb)
                    mu, sd = float(g.mean()), float(g.std())
                    blank = mu < BLANK_DARK or mu > BLANK_BRIGHT or sd < BLANK_STD
                    grey = rgb[::2, ::2].mean(axis=2)
                    cands.append(_Cand(t, rgb, blank, _sharpness(grey)))
                    next_cand = t + step
                last_t = t
        # end of stream
        if S["frames"] == 0:
            raise CorruptVideo("no decodable video frames")
        end_t = last_t + fdur
        if math.isfinite(duration) and duration > 2.0 and end_t < 0.9 * duration - 1.0:
            raise CorruptVideo(f"truncated: frames end at {end_t:.1f}s of {duration:.1f}s")
        # a timestamp hole alone can be legitimate VFR (screen recordings); a hole
        # together with decoder-flagged corruption/errors is lost data
        if S.get("lost_s", 0) > 0.05 * end_t + 0.5 and (S.get("corrupt_frames", 0) or S["errors"]):
            raise CorruptVideo(f"corrupt: {S['lost_s']:.1f}s of {end_t:.1f}s undecodable (hole in timestamps)")
        if S.get("corrupt_frames", 0) > 0.02 * S["frames"] + 2:
            raise CorruptVideo(f"corrupt: {S['corrupt_frames']} of {S['frames']} frames flagged corrupt")
        if S["errors"] > 10 + 0.02 * S["packets"]:
            raise CorruptVideo(f"too many decode errors ({S['errors']} in {S['packets']} packets)")
        m = close(end_t)
        if m is not None:
            yield m
        S["elapsed_s"] = time.monotonic() - t_start
        S["video_s"] = end_t
    finally:
        c.close()



def frame_at(path, time_s: float, max_side: int = 1024, *, time_limit_s: float = 20.0) -> Image.Image:
    """The upright RGB frame shown at `time_s` (seconds from the first frame), at most `max_side`
    on its long side: a seek to the keyframe before it, then decode forward (a thumbnail of a moment)."""
    deadline = time.monotonic() + time_limit_s
    c, st = _open(path, min(10.0, max(MIN_IO_TIMEOUT_S, time_limit_s)))
    try:
        cc = st.codec_context
        cc.thread_type = "AUTO"
        tb = st.time_base
        t0 = float(st.start_time * tb) if (st.start_time is not None and tb) else 0.0
        target = max(0.0, float(time_s)) + t0
        try:
            if target > t0 and tb:
                c.seek(int(target / tb), stream=st, backward=True, any_frame=False)
            best = None
            for pkt in c.demux(st):
                if time.monotonic() > deadline:
                    raise VideoTimeout(f"time limit {time_limit_s:.0f}s exceeded seeking to {time_s:.1f}s")
                for f in pkt.decode():
                    best = f
                    if f.time is None or float(f.time) >= target - 1e-3:
                        break
                else:
                    continue
                break
        except av.error.FFmpegError as e:
            raise CorruptVideo(f"cannot decode at {time_s:.1f}s: {_one_line(e)}") from None
        if best is None:
            raise CorruptVideo(f"no frame at {time_s:.1f}s")
        sar = st.sample_aspect_ratio
        sar = float(sar) if sar and float(sar) > 0 else 1.0
        w, h = best.width * sar, best.height
        sc = min(1.0, max_side / max(w, h))
        rgb = best.reformat(width=max(2, int(round(w * sc))), height=max(2, int(round(h * sc))), format="rgb24").to_ndarray()
        if getattr(best, "color_trc", None) == 16:
            rgb = _pq_to_sdr(rgb)
        return Image.fromarray(np.ascontiguousarray(_upright(rgb, int(round(best.rotation or 0)))))
    finally:
        c.close()
