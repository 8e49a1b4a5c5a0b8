"""What a signal is: `Signal`, the unit a new per-photo feature implements, and `run_signals`,
which the read+decode stage calls on every decoded picture."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

BYTES, JSON = "bytes", "json"


@dataclass(frozen=True)
class SourceFile:
    """The file a picture came from: its path, its bytes and their content hash."""

    path: str
    data: bytes
    content_hash: str


@dataclass(frozen=True)
class SignalResult:
    """One signal's outcome on one content: the stored value, or the reason it failed."""

    content_hash: str  # results are keyed by content, so a copy of a photo is never worked on twice
    name: str  # the signal's registered name (`Signal.name`)
    version: int  # a newer version of the signal re-runs it on every content
    value: bytes | None = None  # `Signal.encode` of what `Signal.extract` found; None when it failed
    reason: str | None = None  # why it failed on this content, recorded like a skipped file
    lines: tuple["TextLine", ...] = ()  # the searchable text of the value (`Signal.text_lines`)


@dataclass(frozen=True)
class TextLine:
    """A line of searchable text a signal found in a photo: as read, folded for matching
    (`loupe.indexer.signals.textmatch.normalize`), its confidence and where it is (JSON, or '')."""

    text: str
    norm: str
    conf: float
    box: str = ""


class Signal(ABC):
    """A per-photo signal. Subclasses set `name`, `version` and `storage`, and implement
    `extract` (the value from a decoded picture) and `distance` (how far two values are).

    Bump `version` whenever `extract` changes what it returns: the next `loupe index` re-runs the
    signal (and only it) on every indexed photo. `min_side` is the short side, in pixels, the
    signal needs: a decode for signals alone (no embedding) is drafted down to it.

    `deferred`: the signal is too slow to run inside the embedding pass; it runs in a second,
    resumable pass after the embeddings of a `loupe index` (search works at once, the signal fills
    in), on its own decode at `min_side`. A signal whose values hold text to search returns its
    lines from `text_lines`: the catalog keeps them in its text index (trigram FTS5 / pg_trgm).
    """

    name: ClassVar[str]
    version: ClassVar[int]
    storage: ClassVar[str] = BYTES  # BYTES: `extract` returns bytes; JSON: any JSON value
    min_side: ClassVar[int] = 256
    deferred: ClassVar[bool] = False

    @abstractmethod
    def extract(self, image, source: SourceFile) -> object:
        """The value of this signal for `image` (an RGB PIL image, EXIF-rotated, at the size the
        decode made; treat it as read-only). Raise to record a failure for this photo."""

    @abstractmethod
    def distance(self, a: object, b: object) -> float:
        """How far apart two values are (0: the same); the search and filter hook."""

    def unavailable(self) -> str | None:
        """Why this signal cannot run here (a missing optional package), or None. An unavailable
        signal is skipped for the whole run, nothing recorded, so it runs once it is installed."""
        return None

    def text_lines(self, value: object) -> list[TextLine]:
        """The searchable text lines of a value (none by default)."""
        return []

    def encode(self, value: object) -> bytes:
        """The stored form of a value."""
        if self.storage == JSON:
            return json.dumps(value, separators=(",", ":")).encode("utf-8")
        return bytes(value)

    def decode(self, data: bytes) -> object:
        """A value back from its stored form."""
        if self.storage == JSON:
            return json.loads(data.decode("utf-8"))
        return data

    def within(self, query: object, stored: dict[str, bytes], max_distance: float) -> list[tuple[str, float]]:
        """The contents whose stored value is within `max_distance` of `query`, nearest first:
        [(content hash, distance)] (`stored`: content hash -> stored form, as `Catalog.signal_values` gives)."""
        hits = [(h, self.distance(query, self.decode(v))) for h, v in stored.items()]
        return sorted([hit for hit in hits if hit[1] <= max_distance], key=lambda hit: (hit[1], hit[0]))


def run_signals(signals: Sequence[Signal], image, source: SourceFile) -> list[SignalResult]:
    """Run each signal on one decoded picture; a signal that raises is recorded with its reason,
    and never stops the others (nor the photo's embedding)."""
    out = []
    for sig in signals:
        try:
            value = sig.extract(image, source)
            out.append(SignalResult(source.content_hash, sig.name, sig.version, value=sig.encode(value), lines=tuple(sig.text_lines(value))))
        except Exception as exc:  # noqa: BLE001 - a signal's failure is a recorded outcome
            reason = f"{type(exc).__name__}: {exc}"[:300]
            out.append(SignalResult(source.content_hash, sig.name, sig.version, reason=reason))
    return out


def split_deferred(signals: Iterable[Signal]) -> tuple[tuple[Signal, ...], tuple[Signal, ...]]:
    """(signals run in the embedding pass, deferred signals run in the pass after it)."""
    signals = tuple(signals)
    return tuple(s for s in signals if not s.deferred), tuple(s for s in signals if s.deferred)


def versions(signals: Iterable[Signal]) -> dict[str, int]:
    """{name: version} of `signals` (what the catalog compares to find the photos a signal lacks)."""
    return {s.name: s.version for s in signals}
