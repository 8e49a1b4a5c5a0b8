"""CLIP's byte-pair tokenizer without torch or open_clip: token ids as a numpy array.

A cold `loupe search` must not import torch (1.8 s) or open_clip (4.2 s) just to turn a sentence
into token ids. This is the algorithm of open_clip's `SimpleTokenizer` with its default settings
(the 'lower' cleaning, truncation, the BPE file open_clip ships), which most open_clip text towers
use; `text_tower.export_text_tower` checks that a model's tokenizer is that one, and that this
module gives the same ids on probe sentences, before a cached text tower relies on it.
Plain printable ASCII (the usual query) skips `ftfy`, which leaves such text unchanged.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
import sqlite3
from functools import lru_cache

import numpy as np

VOCAB_SIZE = 49408
SOT, EOT = "<start_of_text>", "<end_of_text>"
NO_MERGE = 1 << 30
N_MERGES = 49152 - 256 - 2  # the merges open_clip's tokenizer uses (the file holds more)
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e]*")  # printable ASCII without '&': ftfy and unescape are no-ops


def default_bpe_path() -> str:
    """open_clip's BPE merges file, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: its BPE vocabulary file is needed")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def read_merges(path: str) -> list[str]:
    """The BPE merge lines ("first second") open_clip uses, from its .gz file or a plain copy."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    if lines and "#version" in lines[0]:  # open_clip's file starts with a version line
        lines = lines[1:]
    return lines[:N_MERGES]


@lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clean(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, HTML unescape twice, whitespace collapsed, lower case."""
    if not _PLAIN.fullmatch(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.strip().split()).lower()


def vocabulary(merges: list[str]) -> dict[str, int]:
    """Token -> id, as open_clip builds it: the 256 byte characters, the same ending a word, the merges, SOT, EOT."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges] + [SOT, EOT]
    return dict(zip(vocab, range(len(vocab))))


class BpeTable:
    """The merges' ranks and the vocabulary's ids in an SQLite file beside a merges file (`<file>.sqlite`).

    Building both dicts from the 49k merges cost a cold query ~50 ms of pure Python, for the few
    dozen lookups one sentence needs; an indexed file answers those in microseconds. Made once
    (`build`, atomically; `text_tower` builds it when it installs a tower) and checked against the
    merges file's size and time; a folder that cannot be written leaves the tokenizer on dicts.
    """

    VERSION = 1
    MAX_LOOKUPS = 20_000  # past this (a caption corpus), reading the dicts once is cheaper

    SUFFIX = ".sqlite"  # the table's file: the merges file's name with this appended

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con, self.lookups = con, 0

    @classmethod
    def path_of(cls, merges_path: str) -> str:
        return f"{merges_path}{cls.SUFFIX}"

    @classmethod
    def open(cls, merges_path: str) -> "BpeTable | None":
        """The table of a plain merges file (built now if absent or stale), or None."""
        if merges_path.endswith(".gz"):  # open_clip's own file, in site-packages: not written beside
            return None
        try:
            stamp = _stamp(merges_path)
            con = cls._connect(merges_path, stamp)
            if con is None:
                cls.build(merges_path)
                con = cls._connect(merges_path, stamp)
        except (OSError, sqlite3.Error):
            return None
        return None if con is None else cls(con)

    @classmethod
    def _connect(cls, merges_path: str, stamp: str) -> sqlite3.Connection | None:
        path = cls.path_of(merges_path)
        if not os.path.exists(path):
            return None
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        row = con.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()
        if con.execute("PRAGMA user_version").fetchone()[0] != cls.VERSION or row is None or row[0] != stamp:
            con.close()
            return None
        return con

    @classmethod
    def build(cls, merges_path: str) -> None:
        """Write the table of a plain merges file beside it (replacing a stale one)."""
        stamp = _stamp(merges_path)
        merges = read_merges(merges_path)
        path = cls.path_of(merges_path)
        tmp = f"{path}.{os.getpid()}.tmp"
        if os.path.exists(tmp):
            os.unlink(tmp)
        con = sqlite3.connect(tmp)
        try:
            with con:
                con.execute("CREATE TABLE merges (pair TEXT PRIMARY KEY, rank INTEGER NOT NULL) WITHOUT ROWID")
                con.execute("CREATE TABLE vocab (piece TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID")
                con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                con.executemany("INSERT INTO merges VALUES (?, ?)", zip(merges, range(len(merges))))
                con.executemany("INSERT INTO vocab VALUES (?, ?)", vocabulary(merges).items())
                con.execute("INSERT INTO meta VALUES ('source', ?)", (stamp,))
                con.execute(f"PRAGMA user_version = {cls.VERSION}")
        finally:
            con.close()
        os.replace(tmp, path)

    def rank(self, pair: str) -> int:
        self.lookups += 1
        row = self.con.execute("SELECT rank FROM merges WHERE pair = ?", (pair,)).fetchone()
        return NO_MERGE if row is None else row[0]

    def token_id(self, piece: str) -> int:
        self.lookups += 1
        row = self.con.execute("SELECT id FROM vocab WHERE piece = ?", (piece,)).fetchone()
        if row is None:
            raise KeyError(piece)
        return row[0]

    def merges(self) -> list[str]:
        pairs = [p for (p,) in self.con.execute("SELECT pair FROM merges ORDER BY rank")]
        self.con.close()
        return pairs


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


class ClipTokenizer:
    """Token ids exactly as open_clip's default `SimpleTokenizer` gives them, padded with zeros."""

    def __init__(self, context_length: int = 77, bpe_path: str | None = None) -> None:
        import regex  # \p{L} classes; a small import (open_clip depends on it)

        path = bpe_path or default_bpe_path()
        self.table = BpeTable.open(path)  # None: the merges are read into dicts here
        if self.table is None:
            self._load_dicts(read_merges(path))
        self.byte_encoder = _bytes_to_unicode()
        self.cache = {SOT: SOT, EOT: EOT}
        self.pattern = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
        )
        self.context_length = context_length
        self.sot_id, self.eot_id = self._id(SOT), self._id(EOT)

    def _load_dicts(self, merges: list[str]) -> None:
        self.encoder, self.ranks = vocabulary(merges), dict(zip(merges, range(len(merges))))

    def _rank(self, pair: str) -> int:
        if self.table is not None:
            rank = self.table.rank(pair)
            if self.table.lookups > BpeTable.MAX_LOOKUPS:  # many texts (a caption corpus): dicts are cheaper
                self._load_dicts(self.table.merges())
                self.table = None
            return rank
        return self.ranks.get(pair, NO_MERGE)

    def _id(self, piece: str) -> int:
        return self.table.token_id(piece) if self.table is not None else self.encoder[piece]

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            ranked = [(self._rank(f"{a} {b}"), a, b) for a, b in zip(word, word[1:])]
            rank, first, second = min(ranked)
            if rank == NO_MERGE:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without the start and end tokens."""
        ids: list[int] = []
        for token in self.pattern.findall(_clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self._id(t) for t in self._bpe(token).split(" "))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), context_length) int64 ids: start, text, end, zeros; too long ends in the end token."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out
