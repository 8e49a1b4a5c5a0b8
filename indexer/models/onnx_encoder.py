"""The query encoder whose text side is the index's exported ONNX text tower (torch only for images).

Made by `loupe.indexer.models.factory` for CPU searches. Building ViT-B-32 costs ~4 s with its
imports: for a one-off search this encoder builds it only when a query image is not already in the
index (its stored vector is used otherwise), or when the ONNX tower cannot run here; for `loupe
serve` (`load_images`) it builds it in a background thread at once, for uploads.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np


class OnnxEncoder:
    """Offers what `Searcher` uses of an `Encoder`: text through ONNX Runtime in fp32, images through torch."""

    def __init__(self, spec, tower, dim: int, device: str = "auto", load_images: bool = False) -> None:
        self.spec = spec.replace(text_backend="onnx", text_precision="fp32", dim=dim)
        self.tower = tower
        self.dim = dim
        self.device_name = device
        self._torch = None
        self._torch_lock = threading.Lock()
        if load_images:  # a server: images (uploads) must not wait for torch on the first one
            threading.Thread(target=self._load_images, name="loupe-image-encoder", daemon=True).start()

    def _load_images(self) -> None:
        try:
            self.torch_encoder()
        except Exception:  # the first image query reports it
            pass

    @property
    def backend(self) -> str:
        return self.spec.text_backend

    @property
    def text_precision(self) -> str:
        return self.spec.text_precision

    @property
    def weights_id(self) -> str:
        return self.spec.weights_id

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """fp32 vectors from the ONNX tower; if it cannot run here (a damaged file, no onnxruntime), from torch."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "onnx":
            try:
                return self.tower.encode(list(texts), batch_size=batch_size)
            except Exception:  # the same vectors come from the model itself (fp32 too), only slower
                self.spec = self.spec.replace(text_backend="torch")
        return self.torch_encoder().encode_texts(list(texts), batch_size=batch_size)

    def torch_encoder(self):
        """The full open_clip model (image queries that are not indexed), loaded on first use."""
        with self._torch_lock:
            if self._torch is None:
                from loupe.indexer.models.encoder import load_encoder

                self._torch = load_encoder(self.spec.replace(text_backend="torch"), self.device_name)
        return self._torch

    @property
    def image_size(self) -> int:
        return self.torch_encoder().image_size

    @property
    def preprocess(self):
        return self.torch_encoder().preprocess

    def encode_images(self, pixels) -> np.ndarray:
        return self.torch_encoder().encode_images(pixels)
