"""open_clip's eval transform in numpy and PIL, for the model configs whose transform it reproduces.

open_clip's `image_transform` for evaluation is, for most models (resize mode 'shortest', bicubic):
Resize(short side to the input size) -> CenterCrop -> RGB -> ToTensor -> Normalize, built from
torchvision, which imports torch. `transform_record` reads those parameters off a loaded model's
transform (at the image tower's export: `loupe.indexer.models.image_tower`) and returns None for
any other transform; `Preprocess` replays a record with the same PIL calls and float32 arithmetic
as torchvision, so a torch-free run (`loupe.indexer.models.onnx_images`) feeds the tower the same
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESIZE_MODE = "shortest"
INTERPOLATION = "bicubic"


def transform_record(transform) -> dict | None:
    """The parameters of open_clip's eval transform `transform` (a torchvision Compose), or None
    when it is not exactly Resize(shortest, bicubic) -> CenterCrop -> RGB -> ToTensor -> Normalize."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, list) or len(steps) != 5:
        return None
    resize, crop, rgb, to_tensor, normalize = steps
    size = resize.size if type(resize) is T.Resize else None
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    if not isinstance(size, int) or resize.max_size is not None or resize.interpolation != T.InterpolationMode.BICUBIC:
        return None
    if type(crop) is not T.CenterCrop or tuple(crop.size) != (size, size):
        return None
    if not _to_rgb(rgb):
        return None
    if not (type(to_tensor) is T.ToTensor or (type(to_tensor).__module__, type(to_tensor).__name__) == ("open_clip.transform", "MaybeToTensor")):
        return None
    if type(normalize) is not T.Normalize or normalize.inplace or len(normalize.mean) != 3 or len(normalize.std) != 3:
        return None
    return {"resize_mode": RESIZE_MODE, "interpolation": INTERPOLATION, "size": size,
            "mean": [float(m) for m in normalize.mean], "std": [float(s) for s in normalize.std]}


def _to_rgb(step) -> bool:
    """Whether `step` is open_clip's PIL `.convert("RGB")` (`MaybeConvertMode("RGB")`, or `_convert_to_rgb` before 3.x)."""
    if (type(step).__module__, type(step).__name__) == ("open_clip.transform", "MaybeConvertMode"):
        return getattr(step, "mode", None) == "RGB"
    return (getattr(step, "__module__", None), getattr(step, "__name__", None)) == ("open_clip.transform", "_convert_to_rgb")


@dataclass(frozen=True)
class Preprocess:
    """A PIL image in, the model's input (3, size, size) float32 out: the transform `transform_record` read."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_record(cls, record: dict | None) -> "Preprocess | None":
        """The preprocess of a manifest's record (None: a transform this module does not reproduce)."""
        if not isinstance(record, dict) or (record.get("resize_mode"), record.get("interpolation")) != (RESIZE_MODE, INTERPOLATION):
            return None
        try:
            return cls(int(record["size"]), tuple(map(float, record["mean"])), tuple(map(float, record["std"])))
        except (KeyError, TypeError, ValueError):
            return None

    def __call__(self, image) -> np.ndarray:
        from PIL import Image

        size = self.size
        w, h = image.size
        # torchvision's Resize(int): the short side becomes `size`, the long one int(size * long / short)
        short, long = (w, h) if w <= h else (h, w)
        new_w, new_h = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        # torchvision's CenterCrop: its rounding of the offsets
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((pixels - mean) / std)
