"""An index's model without the model: its binding checked from names and hashes, and a query
encoder whose text side is the cached ONNX tower (torch is loaded only if an image needs it).

Building ViT-B-32 costs ~6 s with its imports; checking that options name the index's model costs
a stat (the same checkpoint file, unchanged) or at most a SHA-256 of the file. A no-change
`loupe index DIR --checkpoint F` and a cold text search therefore never build the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def weights_id_of(spec) -> str:
    """What `Encoder.weights_id` would say for `spec`, without loading it (hashes a checkpoint)."""
    if spec.checkpoint:
        from loupe.indexer.models.encoder import file_sha256

        return f"sha256:{file_sha256(spec.checkpoint)}"
    return spec.pretrained or "random"


@dataclass
class SpecOnly:
    """Stands in for an Encoder where only its identity is needed (`Store.check_compatible`)."""

    spec: object
    dim: int
    _weights_id: str | None = field(default=None, repr=False)

    @property
    def weights_id(self) -> str:
        if self._weights_id is None:
            self._weights_id = weights_id_of(self.spec)
        return self._weights_id


def check_binding(store, meta, spec) -> None:
    """Raise the usual LoupeError unless `spec` names the weights `meta` was built with; no model load.

    The architecture name decides the dimension, so only names and weights are compared; a
    checkpoint that is the recorded file (same path, size and mtime) is not even hashed.
    """
    store.check_compatible(meta, SpecOnly(spec, meta.dim))


class OnnxEncoder:
    """The query encoder of a cold search: text through the exported ONNX tower, images through torch.

    Offers what `Searcher` uses of an `Encoder`. The torch model is built only when a query image
    is not already in the index (its stored vector is used otherwise).
    """

    backend = "onnx"
    text_precision = "fp32"

    def __init__(self, spec, tower, dim: int, device: str = "auto") -> None:
        self.spec = spec
        self.tower = tower
        self.dim = dim
        self.device_name = device
        self._identity = SpecOnly(spec, dim)
        self._torch = None

    @property
    def weights_id(self) -> str:
        return self._identity.weights_id

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """fp32 vectors from the ONNX tower; if it cannot run here (a damaged file, no onnxruntime), from torch."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "onnx":
            try:
                return self.tower.encode(list(texts), batch_size=batch_size)
            except Exception:  # the same vectors come from the model itself, only slower
                self.backend = "torch"
        return self.torch_encoder().encode_texts(list(texts), batch_size=batch_size)

    def torch_encoder(self):
        """The full open_clip model (image queries that are not indexed), loaded on first use."""
        if self._torch is None:
            from loupe.indexer.models.encoder import load_encoder

            self._torch = load_encoder(self.spec, self.device_name)
        return self._torch

    @property
    def image_size(self) -> int:
        return self.torch_encoder().image_size

    @property
    def preprocess(self):
        return self.torch_encoder().preprocess

    def encode_images(self, pixels) -> np.ndarray:
        return self.torch_encoder().encode_images(pixels)
