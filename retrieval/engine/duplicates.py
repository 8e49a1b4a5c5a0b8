"""Near-duplicate groups: candidates from an index, verification only on candidates, incremental.

Two tiers: "same" (one picture in several files: re-encoded, resized, cropped, brightened,
rotated a little, EXIF-rotated, converted, small overlays; byte-identical files too) and "similar"
(one scene moments apart: bursts, retakes). The unit grouped is a content (its near-duplicate
signal, `loupe.indexer.signals.neardup`); a group's files are the visible files of its contents.

* Candidates: a FAISS `IndexBinaryMultiHash` over both pHashes of every content (full frame and
  centre crop), range-searched with the full-frame pHash at `RADIUS` bits. No all-pairs work.
* Verification: `neardup.compare` on the candidate pairs only (ORB + RANSAC, aligned thumbnails,
  containment, capture times); signals are parsed only for contents that are in a candidate pair.
* Groups: "same" = connected components of same-edges; "similar" = components of same and
  similar edges that span two "same" clusters or more.
* Incremental: `Grouper` keeps its hash arrays, union-find parents and edges; its state is
  saved beside the index (`{prefix}duplicates.npz`). New contents are searched against all, and
  verified only against their candidates; nothing else is recomputed.
* The keeper: `choose_keeper`, an ordered rule where each step only decides on a clear
  difference, with the deciding steps given as the reason.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from loupe.indexer.signals import neardup
from loupe.indexer.signals.neardup import Parsed, compare, parse
from loupe.retrieval.engine.copies import Parents, state_path

RADIUS = 12  # pHash bits; uniform random 64-bit hashes fall this close with p ~ 2.6e-7
BURST_WINDOW = 10.0  # s: photos captured this close are candidates too (bursts whose pHashes moved further) ...
BURST_RADIUS = 24  # ... when their pHashes (full or centre) are within this many bits
STATE_VERSION = 1
TIERS = ("same", "similar")
_SAME, _SIMILAR = 1, 2


# Multi-index hashing (Norouzi et al.): each 64-bit hash is cut into 4 chunks of 16 bits; a pair within
# `radius` bits agrees on some chunk up to 1 flipped bit whenever it is within 7 bits (pigeonhole),
# and usually up to 12. Three cuts over differently permuted bits find 98% of pairs drawn uniformly at
# 0..12 bits (100% up to 9). Probing is bucket offsets over sorted rows, in numpy: FAISS's
# IndexBinaryMultiHash took 15 s per range search of 100k at nflip=1 (load ~10) for the same answer.
PERMUTATIONS = [np.arange(64)] + [np.random.default_rng(seed).permutation(64) for seed in (1, 2)]
_FLIPS = np.array([0] + [1 << b for b in range(16)], dtype=np.uint64)


def _byte_tables(perm: np.ndarray) -> np.ndarray:
    """T[k, v]: the permuted bits contributed by byte k (from the top) having value v."""
    t = np.zeros((8, 256), np.uint64)
    for k in range(8):
        for bit in range(8):
            dst = 63 - int(np.flatnonzero(perm == (8 * k + bit))[0])
            has = (np.arange(256) >> (7 - bit)) & 1
            t[k] |= (has.astype(np.uint64) << np.uint64(dst))
    return t


_TABLES = [None] + [_byte_tables(p) for p in PERMUTATIONS[1:]]


def _permute(h: np.ndarray, which: int) -> np.ndarray:
    if which == 0:
        return h
    t = _TABLES[which]
    out = np.zeros(len(h), np.uint64)
    for k in range(8):
        out |= t[k][((h >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)).astype(np.intp)]
    return out


class _MultiIndex:
    """Rows of 64-bit hashes; `near(q, radius)`: (query row, db row) pairs within `radius` bits."""

    def __init__(self) -> None:
        self.codes = np.zeros(0, np.uint64)
        self.tables: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, codes: np.ndarray) -> None:
        self.codes = np.concatenate([self.codes, codes.astype(np.uint64)])
        self.tables = []
        for which in range(len(PERMUTATIONS)):
            p = _permute(self.codes, which)
            for c in range(4):
                v = ((p >> np.uint64(16 * c)) & np.uint64(0xFFFF)).astype(np.uint64)
                order = np.argsort(v, kind="stable")
                starts = np.zeros(65537, np.int64)
                np.cumsum(np.bincount(v.astype(np.intp), minlength=65536), out=starts[1:])
                self.tables.append((which, c, starts, order))

    def near(self, q: np.ndarray, radius: int, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        qs, ds = [], []
        for s0 in range(0, len(q), batch):
            part = q[s0 : s0 + batch].astype(np.uint64)
            permuted = {}
            for which, c, starts, order in self.tables:
                if which not in permuted:
                    permuted[which] = _permute(part, which)
                v = (permuted[which] >> np.uint64(16 * c)) & np.uint64(0xFFFF)
                probes = (v[:, None] ^ _FLIPS[None, :]).ravel().astype(np.intp)
                lo = starts[probes]  # bucket ranges of the sorted rows: no search
                hi = starts[probes + 1]
                counts = hi - lo
                total = int(counts.sum())
                if not total:
                    continue
                qi = np.repeat(np.repeat(np.arange(len(part)), len(_FLIPS)), counts)
                offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                di = order[np.repeat(lo, counts) + offs]
                close = np.bitwise_count(part[qi] ^ self.codes[di]) <= radius
                qs.append(qi[close] + s0)
                ds.append(di[close])
        if not qs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(qs).astype(np.int64), np.concatenate(ds).astype(np.int64)


@dataclass
class AddReport:
    added: int = 0
    candidates: int = 0
    same_edges: int = 0
    similar_edges: int = 0


class Grouper:
    """The grouping state: contents (keys), their pHashes and capture times, union-find parents
    of both tiers, and the verified edges (i, j, tier, containment, scale, residual)."""

    def __init__(self, radius: int = RADIUS) -> None:
        self.radius = radius
        self.index = _MultiIndex()
        self.keys: list[str] = []
        self.pos: dict[str, int] = {}
        self.ph = np.zeros(0, np.uint64)
        self.ph88 = np.zeros(0, np.uint64)
        self.times = np.zeros(0, np.float64)
        self.same = Parents()
        self.sim = Parents()
        self.edges = np.zeros((0, 6), np.float64)

    def __len__(self) -> int:
        return len(self.keys)

    # ---- adding -------------------------------------------------------------------------
    def add(self, keys: Sequence[str], sigs: Sequence[bytes], fetch: Callable[[list[str]], dict[str, bytes]] | None = None) -> AddReport:
        """Add contents (`keys`, their signals) and verify them against their candidates only.
        `fetch(keys)` returns the signals of earlier contents that became candidates."""
        fresh = [(k, s) for k, s in zip(keys, sigs) if k not in self.pos and s]
        if not fresh:
            return AddReport()
        keys = [k for k, _ in fresh]
        sigs = [s for _, s in fresh]
        head = neardup.headers(sigs)
        if np.any(head["v"] != neardup.VERSION):
            raise ValueError("near-duplicate signals of another version: run `loupe index` on the folders first")
        start = len(self.keys)
        self.keys.extend(keys)
        self.pos.update((k, start + i) for i, k in enumerate(keys))
        ph, ph88 = head["ph"].astype(np.uint64), head["ph88"].astype(np.uint64)
        self.ph = np.concatenate([self.ph, ph])
        self.ph88 = np.concatenate([self.ph88, ph88])
        self.times = np.concatenate([self.times, head["time"].astype(np.float64)])
        n = len(self.keys)
        self.same.grow(n)
        self.sim.grow(n)
        codes = np.empty(2 * len(keys), np.uint64)
        codes[0::2], codes[1::2] = ph, ph88
        self.index.add(codes)
        pairs = self._candidates(start, ph)
        report = AddReport(len(keys), len(pairs))
        if not len(pairs):
            return report
        local = {start + i: s for i, s in enumerate(sigs)}
        need = sorted({int(x) for x in np.unique(pairs) if int(x) not in local})
        if need:
            if fetch is None:
                raise ValueError("earlier contents are candidates but no way to fetch their signals was given")
            got = fetch([self.keys[i] for i in need])
            local.update((i, got[self.keys[i]]) for i in need if self.keys[i] in got)
        parsed: dict[int, Parsed] = {}

        def p(i: int) -> Parsed:
            if i not in parsed:
                parsed[i] = parse(local[i])
            return parsed[i]

        edges = []
        for i, j in pairs.tolist():
            if i not in local or j not in local:
                continue
            m = compare(p(i), p(j))
            if m.tier == "same":
                self.same.union(i, j)
                self.sim.union(i, j)
                report.same_edges += 1
            elif m.tier == "similar":
                self.sim.union(i, j)
                report.similar_edges += 1
            else:
                continue
            edges.append((i, j, _SAME if m.tier == "same" else _SIMILAR, m.contain, m.scale, m.resid))
        if edges:
            self.edges = np.concatenate([self.edges, np.array(edges, np.float64)])
        return report

    def _candidates(self, start: int, ph: np.ndarray) -> np.ndarray:
        """(i, j) pairs, i < j, at least one of them new, whose pHashes (full or centre) are within `radius`."""
        qi, di = self.index.near(ph, self.radius)
        q = qi + start
        other = di >> 1  # rows 2j, 2j+1 are content j
        keep = other != q
        lo, hi = np.minimum(q[keep], other[keep]), np.maximum(q[keep], other[keep])
        key = lo * (1 << 32) + hi
        tq, to = self._time_neighbours(start)
        if len(tq):
            key = np.concatenate([key, np.minimum(tq, to) * (1 << 32) + np.maximum(tq, to)])
        key = np.unique(key)
        return np.stack([key >> 32, key & 0xFFFFFFFF], axis=1) if len(key) else np.zeros((0, 2), np.int64)

    def _time_neighbours(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(new, other) pairs captured within BURST_WINDOW of each other with pHashes within BURST_RADIUS."""
        known = np.flatnonzero(~np.isnan(self.times))
        if len(known) < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        order = known[np.argsort(self.times[known], kind="stable")]
        t = self.times[order]
        new = np.arange(start, len(self.keys))
        new = new[~np.isnan(self.times[new])]
        lo = np.searchsorted(t, self.times[new] - BURST_WINDOW, "left")
        hi = np.searchsorted(t, self.times[new] + BURST_WINDOW, "right")
        counts = hi - lo
        q = np.repeat(new, counts)
        offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        o = order[np.repeat(lo, counts) + offs]
        keep = (o != q) & ((o < start) | (o > q))  # new-new pairs once
        q, o = q[keep], o[keep]
        d = np.minimum(np.minimum(np.bitwise_count(self.ph[q] ^ self.ph[o]), np.bitwise_count(self.ph[q] ^ self.ph88[o])),
                       np.bitwise_count(self.ph88[q] ^ self.ph[o]))
        close = d <= BURST_RADIUS
        return q[close].astype(np.int64), o[close].astype(np.int64)

    # ---- groups -------------------------------------------------------------------------
    def clusters(self) -> list[tuple[str, list[int], np.ndarray]]:
        """[(tier, member indices, their edges)]: "same" components, then "similar" ones spanning 2+ same clusters."""
        out = []
        if not len(self.keys):
            return out
        same_roots, sim_roots = self.same.roots(), self.sim.roots()
        for tier, roots in (("same", same_roots), ("similar", sim_roots)):
            order = np.argsort(roots, kind="stable")
            r = roots[order]
            bounds = np.flatnonzero(np.diff(r)) + 1
            for members in np.split(order, bounds):
                if len(members) < 2:
                    continue
                if tier == "similar" and len(np.unique(same_roots[members])) < 2:
                    continue
                out.append((tier, members.tolist(), None))
        if len(self.edges):
            e = self.edges
            root_of = {"same": same_roots, "similar": sim_roots}
            by_root: dict[tuple[str, int], list[int]] = {}
            for k, (i, _j) in enumerate(e[:, :2].astype(np.int64)):
                by_root.setdefault(("same", int(same_roots[i])), []).append(k)
                by_root.setdefault(("similar", int(sim_roots[i])), []).append(k)
            out = [(t, m, e[by_root.get((t, int(root_of[t][m[0]])), [])]) for t, m, _ in out]
        else:
            out = [(t, m, np.zeros((0, 6))) for t, m, _ in out]
        return out

    # ---- state ----------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the state atomically (a crash leaves the previous state)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, version=np.array([STATE_VERSION, neardup.VERSION, self.radius]), keys=np.array(self.keys, dtype="U64"),
                     ph=self.ph, ph88=self.ph88, times=self.times, same=self.same.p, sim=self.sim.p, edges=self.edges)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Grouper":
        """The saved state, or an empty grouper when there is none (or it is of another version)."""
        g = cls()
        try:
            with np.load(path, allow_pickle=False) as z:
                v = z["version"].tolist()
                if v[0] != STATE_VERSION or v[1] != neardup.VERSION:
                    return g
                g.radius = int(v[2])
                g.keys = z["keys"].tolist()
                g.ph, g.ph88, g.times = z["ph"], z["ph88"], z["times"]
                g.same, g.sim, g.edges = Parents(z["same"]), Parents(z["sim"]), z["edges"]
        except (OSError, KeyError, ValueError):
            return cls()
        g.pos = {k: i for i, k in enumerate(g.keys)}
        if g.keys:
            codes = np.empty(2 * len(g.keys), np.uint64)
            codes[0::2], codes[1::2] = g.ph, g.ph88
            g.index.add(codes)
        return g


# ---- files and the keeper ---------------------------------------------------------------------
FORMAT_RANK = {"dng": 0, "cr2": 0, "cr3": 0, "nef": 0, "arw": 0, "orf": 0, "rw2": 0, "raf": 0, "heic": 1, "heif": 1,
               "jpg": 2, "jpeg": 2, "tif": 3, "tiff": 3, "png": 4, "webp": 4, "gif": 5, "bmp": 5}


@dataclass
class Member:
    """One file of a group, with what the keeper rule and the review page show."""

    path: str
    content_hash: str
    size: int
    mtime_ns: int
    width: int
    height: int
    taken_at: object  # datetime | None (the catalog's)
    sharpness: float = 0.0
    clip: float = 0.0
    flags: int = 0
    capture: float = math.nan  # capture time from the signal (sub-second), NaN unknown
    cropped: bool = False
    upscaled: bool = False
    resid: float = 0.0  # mean residual to the other members (local edits stand out)
    id: int | None = None  # the catalog row

    @property
    def format(self) -> str:
        return os.path.splitext(self.path)[1].lstrip(".").lower()

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    @property
    def when(self) -> float:
        if not math.isnan(self.capture):
            return self.capture
        return self.taken_at.timestamp() if self.taken_at is not None else math.nan

    def to_json(self) -> dict:
        return {
            "id": self.id, "path": self.path, "hash": self.content_hash, "size": self.size, "width": self.width, "height": self.height,
            "taken_at": self.taken_at.isoformat() if self.taken_at is not None else None, "format": self.format,
            "sharpness": round(self.sharpness, 1), "modified": round(self.mtime_ns / 1e9, 3), "cropped": self.cropped,
            "upscaled": self.upscaled, "camera_metadata": bool(self.flags & neardup.CAMERA) and not self.flags & neardup.SOFTWARE,
        }


@dataclass
class Group:
    tier: str
    members: list[Member]
    keep: str = ""
    reason: str = ""
    id: str = ""

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.members]

    def to_json(self) -> dict:
        return {"id": self.id, "tier": self.tier, "paths": self.paths, "keep": self.keep, "reason": self.reason,
                "files": [m.to_json() for m in self.members]}


def choose_keeper(members: Sequence[Member]) -> tuple[int, str]:
    """The member to keep and why. Ordered steps; each decides only on a clear difference:

    1 not cropped (no other member's field of view strictly holds it)
    2 largest pixel count (within 2%; an upscaled copy, 1.5x the pixels of an uncropped member in under 0.35x its bytes per pixel, counts as small)
    3 original format (camera raw > HEIC > JPEG > TIFF > PNG/WebP > GIF/BMP)
    4 camera metadata intact (EXIF make/model, no editing software tag)
    5 fewest blown highlights (brightened copies clip)
    6 no local edits (overlays stand out against the other members)
    7 has a capture time, then the earliest capture
    8 least compressed (bytes per pixel), then sharpest
    9 oldest file (modification time: last, copies often lose it), then path order
    """
    n = len(members)
    if n == 1:
        return 0, "only member"
    cand = list(range(n))
    reasons: list[str] = []

    def narrow(key, tol: float, label: str) -> None:
        nonlocal cand
        values = {i: key(i) for i in cand}
        best = min(values.values())
        keep = [i for i in cand if values[i] <= best + tol]
        if len(keep) < len(cand):
            reasons.append(label)
            cand = keep

    m = members
    bpp = [mm.size / max(1, mm.pixels) for mm in m]
    hashes = {mm.content_hash for mm in m}
    narrow(lambda i: int(m[i].cropped), 0, "not cropped")
    narrow(lambda i: -m[i].pixels * (0.01 if m[i].upscaled else 1), 0.02 * max(mm.pixels for mm in m), "largest pixel count")
    narrow(lambda i: FORMAT_RANK.get(m[i].format, 4), 0, "original format")
    narrow(lambda i: 0 if (m[i].flags & neardup.CAMERA and not m[i].flags & neardup.SOFTWARE) else 1, 0, "camera metadata intact")
    narrow(lambda i: m[i].clip, 0.01, "fewer blown highlights")
    if len(hashes) > 2:
        narrow(lambda i: m[i].resid, 0.5, "no local edits")
    narrow(lambda i: 0 if not math.isnan(m[i].when) else 1, 0, "has capture time")
    narrow(lambda i: m[i].when if not math.isnan(m[i].when) else 0.0, 0.01, "earliest capture")
    narrow(lambda i: -bpp[i], 0.05 * max(bpp[i] for i in cand), "least compressed")
    narrow(lambda i: -m[i].sharpness, 0.1 * max(m[i].sharpness for i in cand), "sharpest")
    narrow(lambda i: m[i].mtime_ns, 0, "oldest file")
    k = min(cand, key=lambda i: m[i].path)
    if not reasons:
        return k, "identical copies: first path"
    return k, ", ".join(reasons)


def _annotate(members: list[Member], index_of: dict[str, int], edges: np.ndarray, keys: list[str]) -> None:
    """Cropped / upscaled / residual marks of each member, from the group's verified edges."""
    by_hash: dict[str, list[Member]] = {}
    for mm in members:
        by_hash.setdefault(mm.content_hash, []).append(mm)
    resid: dict[str, list[float]] = {}
    for i, j, tier, contain, scale, res in edges.tolist():
        a, b = keys[int(i)], keys[int(j)]
        if a not in by_hash or b not in by_hash or int(tier) != _SAME:
            continue
        if contain == 1 and scale < 0.96:
            for mm in by_hash[b]:
                mm.cropped = True
        elif contain == -1 and scale > 1 / 0.96:
            for mm in by_hash[a]:
                mm.cropped = True
        resid.setdefault(a, []).append(res)
        resid.setdefault(b, []).append(res)
    for mm in members:
        r = resid.get(mm.content_hash)
        mm.resid = float(np.mean(r)) if r else 0.0
    for a in members:
        for b in members:
            if (a.pixels > 1.5 * b.pixels and a.format == b.format and b.pixels and not b.cropped
                    and a.size / max(1, a.pixels) < 0.35 * b.size / max(1, b.pixels)):
                a.upscaled = True


def group_id(tier: str, hashes: Iterable[str]) -> str:
    """A stable id of a group: its tier and its sorted content hashes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(tier.encode())
    for x in sorted(hashes):
        h.update(x.encode())
    return h.hexdigest()


# ---- over a catalog ------------------------------------------------------------------------------
SIGNAL = "neardup"


@dataclass
class Grouping:
    """Groups of the visible files of a catalog, and how they were made."""

    groups: list[Group] = field(default_factory=list)
    contents: int = 0
    lacking: int = 0  # visible contents without the signal (index them again)
    added: AddReport = field(default_factory=AddReport)


def update_state(store) -> tuple[Grouper, AddReport, int]:
    """Load the saved grouping of `store`, add the contents signalled since, save it; (grouper, what was added, contents lacking the signal)."""
    catalog = store.catalog
    path = state_path(store.location)
    g = Grouper.load(path)
    stored = catalog.signal_hashes(SIGNAL, neardup.VERSION)
    new = [h for h in stored if h not in g.pos]
    report = AddReport()
    for start in range(0, len(new), 20000):
        part = new[start : start + 20000]
        values = catalog.signal_values(SIGNAL, neardup.VERSION, part)
        r = g.add([h for h in part if h in values], [values[h] for h in part if h in values],
                  fetch=lambda keys: catalog.signal_values(SIGNAL, neardup.VERSION, keys))
        report.added += r.added
        report.candidates += r.candidates
        report.same_edges += r.same_edges
        report.similar_edges += r.similar_edges
    if report.added and getattr(catalog, "read_only", False) is False:
        try:
            g.save(path)
        except OSError:
            pass  # a read-only index folder: grouped again next time
    visible = catalog.visible_content_hashes()
    lacking = len(visible.difference(stored))
    return g, report, lacking


def find_groups(store, tiers: Sequence[str] = TIERS, filters=None) -> Grouping:
    """The near-duplicate groups of the visible files (those passing `filters`, a `Filters`), keepers chosen."""
    g, report, lacking = update_state(store)
    files: dict[str, list] = {}
    folder_key = filters.folder_key if filters is not None and filters.folder else None
    for row in store.catalog.iter_image_rows(folder_key, status="ok"):
        if row.content_hash and (filters is None or filters.passes(row)):
            files.setdefault(row.content_hash, []).append(row)
    out = Grouping(contents=len(files), lacking=lacking, added=report)
    heads: dict[str, Parsed] = {}
    grouped: set[str] = set()
    clusters = [c for c in g.clusters() if c[0] in tiers]
    need = {g.keys[i] for t, mem, _ in clusters for i in mem if g.keys[i] in files}
    for h, v in store.catalog.signal_values(SIGNAL, neardup.VERSION, sorted(need)).items() if need else ():
        heads[h] = parse(v)

    def member(row) -> Member:
        p = heads.get(row.content_hash)
        return Member(row.path, row.content_hash, row.size, row.mtime_ns, row.width or 0, row.height or 0, row.taken_at,
                      p.sharp if p else 0.0, p.clip if p else 0.0, p.flags if p else 0, p.time if p else math.nan, id=row.id)

    for tier, mem, edges in clusters:
        hashes = [g.keys[i] for i in mem if g.keys[i] in files]
        if tier == "same":
            grouped.update(hashes)
        members = [member(r) for h in hashes for r in files[h]]
        if len(hashes) < 2 and not (tier == "same" and len(members) > 1):
            continue
        _annotate(members, g.pos, edges, g.keys)
        members.sort(key=lambda mm: mm.path)
        k, reason = choose_keeper(members)
        out.groups.append(Group(tier, members, members[k].path, reason, group_id(tier, hashes)))
    if "same" in tiers:  # byte-identical files of a content in no group of its own
        for h, rows in files.items():
            if len(rows) > 1 and h not in grouped:
                members = sorted((member(r) for r in rows), key=lambda mm: mm.path)
                k, reason = choose_keeper(members)
                out.groups.append(Group("same", members, members[k].path, "identical files; " + reason, group_id("same", [h])))
    out.groups.sort(key=lambda gr: (TIERS.index(gr.tier), gr.keep))
    return out
