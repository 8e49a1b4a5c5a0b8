"""Captioned image sets for evaluation and training, from the formats people actually have.

- Karpathy's split files (`dataset_flickr30k.json`, `dataset_coco.json`): {"images": [{"filename",
  "split", "sentences": [{"raw"}], ...}]}; one split is taken (the test split by default).
- LAVIS / CLIP_benchmark json: [{"image": "flickr30k-images/x.jpg", "caption": [..] or ".."}];
  the training files repeat an image once per caption, so entries are merged by image.
- loupe's captions.json (../shared/data): [{"image": "x.jpg", "captions": [..]}].
The format is detected from the content, not the file name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from loupe.indexer.errors import LoupeError

FORMATS = ("karpathy", "lavis", "loupe")


@dataclass
class Annotations:
    """Image names (relative to an images folder) and their captions, in file order."""

    images: list[str]
    captions: list[str]
    caption_image: list[int]  # caption index -> index into `images`
    source: str = ""
    format: str = ""
    dropped_images: int = 0  # entries without a single non-empty caption

    def subset(self, keep: list[int]) -> "Annotations":
        """Only the images at positions `keep` (in that order) and their captions."""
        new_index = {old: new for new, old in enumerate(keep)}
        caps = [(c, new_index[i]) for c, i in zip(self.captions, self.caption_image) if i in new_index]
        return Annotations(
            images=[self.images[i] for i in keep],
            captions=[c for c, _ in caps],
            caption_image=[i for _, i in caps],
            source=self.source,
            format=self.format,
            dropped_images=self.dropped_images,
        )


@dataclass
class _Builder:
    images: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def add(self, image: object, texts: list[object]) -> None:
        name = str(image).strip() if image is not None else ""
        if not name:
            raise ValueError("an entry has no image name")
        self.seen.add(name)
        texts = [str(t).strip() for t in texts if t is not None and str(t).strip()]
        if not texts:
            return
        if name not in self.index:
            self.index[name] = len(self.images)
            self.images.append(name)
        for text in texts:
            self.captions.append(text)
            self.caption_image.append(self.index[name])


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _detect(data: object) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = next(iter(data["images"]), None)
        if isinstance(first, dict) and "sentences" in first and "filename" in first:
            return "karpathy"
    if isinstance(data, list) and data and all(isinstance(e, dict) for e in data[:50]):
        if all("image" in e and "captions" in e for e in data[:50]):
            return "loupe"
        if all("image" in e and "caption" in e for e in data[:50]):
            return "lavis"
    return None


def load_annotations(path: str | os.PathLike, split: str = "test") -> Annotations:
    """Read an annotations file in any supported format; `split` only applies to Karpathy files."""
    p = Path(path)
    if not p.is_file():
        raise LoupeError(f"annotations file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise LoupeError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise LoupeError(f"{p}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    fmt = _detect(data)
    if fmt is None:
        raise LoupeError(
            f"{p}: unknown annotations format; expected Karpathy's dataset_*.json "
            '({"images": [{"filename", "split", "sentences"}]}), a LAVIS/CLIP_benchmark list '
            '([{"image", "caption"}]) or captions.json ([{"image", "captions"}])'
        )
    b = _Builder()
    try:
        if fmt == "karpathy":
            for entry in data["images"]:
                if entry.get("split") != split:
                    continue
                name = os.path.join(entry.get("filepath") or "", entry["filename"])
                b.add(name, [s.get("raw") for s in entry.get("sentences", []) if isinstance(s, dict)])
            if not b.seen:
                splits = sorted({str(e.get("split")) for e in data["images"]})
                raise LoupeError(f"{p}: no images in split '{split}' (splits present: {', '.join(splits)})")
        else:
            key = "captions" if fmt == "loupe" else "caption"
            for entry in data:
                b.add(entry.get("image"), _as_list(entry.get(key)))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise LoupeError(f"{p}: malformed {fmt} annotations ({type(exc).__name__}: {exc})") from None
    if not b.images:
        raise LoupeError(f"{p}: no captioned images found")
    return Annotations(
        images=b.images,
        captions=b.captions,
        caption_image=b.caption_image,
        source=str(p),
        format=fmt,
        dropped_images=len(b.seen) - len(b.images),
    )


def resolve_image_paths(images_dir: str | os.PathLike, names: list[str]) -> list[Path | None]:
    """Where each named image is under `images_dir` (None when absent).

    LAVIS names carry their folder ('flickr30k-images/x.jpg') while users point at that folder
    itself, so a name that is not found as given is also tried by its base name.
    """
    root = Path(images_dir)
    out: list[Path | None] = []
    for name in names:
        candidate = root / name
        if not candidate.is_file() and os.path.basename(name) != name:
            candidate = root / os.path.basename(name)
        out.append(candidate if candidate.is_file() else None)
    return out
