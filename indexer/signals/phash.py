"""The perceptual hash signal: a 64-bit DCT hash (pHash) and a 64-bit difference hash (dHash)
of the picture's luminance, for finding near-identical photos (re-encodes, resizes, small edits).

Stored as 16 bytes (pHash then dHash, big-endian). Two photos are near-identical when their
pHashes differ in few bits: `distance` is that Hamming distance (0..64).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from loupe.indexer.signals.base import Signal, SourceFile

_SIDE = 32  # the DCT input: 32x32 luminance, of which the lowest 8x8 frequencies make the hash
_N = np.arange(_SIDE)
_DCT = np.sqrt(2.0 / _SIDE) * np.cos(np.pi * (2 * _N[None, :] + 1) * _N[:, None] / (2 * _SIDE))  # DCT-II, rows = frequencies


class Hashes(NamedTuple):
    phash: int
    dhash: int


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.astype(np.uint8).ravel()).tobytes(), "big")


def perceptual_hashes(image: Image.Image) -> Hashes:
    """pHash and dHash of a PIL image (any mode, any size)."""
    factor = min(image.size) // (4 * _SIDE)
    if factor > 1:  # a fast box reduction first: the conversion and Lanczos resizes then read few pixels
        image = image.reduce(factor)
    gray = image.convert("L")
    small = np.asarray(gray.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ small @ _DCT.T)[:8, :8]
    phash = _bits_to_int(low > np.median(low))
    diff = np.asarray(gray.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    dhash = _bits_to_int(diff[:, 1:] > diff[:, :-1])
    return Hashes(phash, dhash)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class PerceptualHash(Signal):
    name = "phash"
    version = 1
    min_side = 64

    def extract(self, image: Image.Image, source: SourceFile) -> Hashes:
        return perceptual_hashes(image)

    def encode(self, value: Hashes) -> bytes:
        return value.phash.to_bytes(8, "big") + value.dhash.to_bytes(8, "big")

    def decode(self, data: bytes) -> Hashes:
        return Hashes(int.from_bytes(data[:8], "big"), int.from_bytes(data[8:16], "big"))

    def distance(self, a: Hashes, b: Hashes) -> float:
        """Hamming distance of the pHashes (0..64); near-identical photos stay under about 10."""
        return float(hamming(a.phash, b.phash))
