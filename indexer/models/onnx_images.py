"""The image encoder of a `loupe index` run that needs no torch: the cached ONNX image tower alone.

On CPUs the image tower already runs on ONNX Runtime (`loupe.indexer.models.image_tower`); what
kept torch and open_clip in every run (~3 s of imports, ~0.5 s of model build) was the eval
transform, the first-batch check against torch fp32, and the model itself. When the tower of the
weights is cached with its transform (`preprocess.Preprocess`) and was checked against torch by
the very ONNX Runtime version installed here, that export-time check stands for the per-run one:
its lowest cosine is what the index records, as precision 'onnx-fp32'. Made by
`loupe.indexer.models.factory.index_encoder`, which falls back to the torch encoder otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loupe.indexer.models import precision as precisions
from loupe.indexer.models.spec import ModelSpec


class OnnxImageEncoder:
    """What the indexing pipeline and `Store.bind`/`admit_precision` use of an `Encoder`, images only:
    numpy pixels from `preprocess`, vectors from the ONNX tower (no text side)."""

    numpy_pixels = True  # `stages.embed_batch` stacks its pixels with numpy, not torch
    image_backend = "onnx"
    image_precision = "onnx-fp32"

    def __init__(self, spec: ModelSpec, tower, preprocess, dim: int, image_cosine: float,
                 min_cosine: float = precisions.MIN_COSINE) -> None:
        self.spec = spec.replace(image_backend="onnx", image_precision="fp32", dim=dim)
        self.tower = tower
        self.preprocess = preprocess
        self.image_size = preprocess.size
        self.dim = dim
        self.image_cosine = image_cosine  # measured by the export's check (`image_tower.MIN_COSINE`)
        self.image_bound = min_cosine
        self.fidelity_seconds = 0.0
        self.precision_notice: str | None = None

    @property
    def weights_id(self) -> str:
        return self.spec.weights_id

    def encode_images(self, pixels) -> np.ndarray:
        """Embed a preprocessed batch (N, 3, H, W) into L2-normalised float32 rows."""
        return self.tower.encode(pixels)


def cached_image_encoder(spec: ModelSpec, min_cosine: float = precisions.MIN_COSINE, folder: Path | None = None) -> OnnxImageEncoder | None:
    """The torch-free encoder of `spec`'s images, or None when its tower is not cached here, not
    usable, recorded without a transform `Preprocess` reproduces, checked by another ONNX Runtime
    version, or cannot be loaded."""
    import onnxruntime

    from loupe.indexer.models.image_tower import OnnxImageTower, manifests
    from loupe.indexer.models.preprocess import Preprocess

    for path, data in manifests(spec.weights_id, folder):
        if data.get("model") != spec.model or not data.get("usable"):
            continue
        preprocess = Preprocess.from_record(data.get("preprocess"))
        if preprocess is None or preprocess.size != data.get("image_size") or data.get("onnxruntime") != onnxruntime.__version__:
            continue
        try:
            tower = OnnxImageTower(path.parent / data["file"], float(data["min_cosine"]))
            dim = int(data["dim"])
        except Exception:  # a damaged or removed file: the torch path exports it again
            continue
        return OnnxImageEncoder(spec, tower, preprocess, dim, tower.min_cosine, min_cosine)
    return None
