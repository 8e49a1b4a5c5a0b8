"""A synthetic captioned image set that a tiny CLIP can learn on a CPU in minutes.

Each 64x64 picture holds 1-3 copies of one shape in one colour, grouped in one of five places,
on a random background with pixel noise; its caption says exactly that ("two red circles on
the left"): 4 shapes x 8 colours x 5 places x 3 counts = 480 captions. Held-out parts: new
pictures of seen combinations, and colour-shape pairs that never occur in training (each
colour and each shape still does), which tests composition rather than memorisation.
Generated into a temporary folder at test time; never stored in the repository.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# (x0, y0, x1, y1) boxes the shapes' centres are drawn in; they do not overlap.
PLACES = {
    "on the left": (6, 16, 15, 48),
    "on the right": (49, 16, 58, 48),
    "at the top": (16, 6, 48, 15),
    "at the bottom": (16, 49, 48, 58),
    "in the middle": (22, 22, 42, 42),
}
COUNTS = {1: "a", 2: "two", 3: "three"}
# Never in training: one pair per shape and per colour, so every colour and shape is still seen.
UNSEEN_PAIRS = frozenset({("circle", "green"), ("square", "orange"), ("triangle", "white"), ("cross", "blue")})


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    place: str
    count: int

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + ("es" if self.shape == "cross" else "s")
        return f"{COUNTS[self.count]} {self.colour} {noun} {self.place}"


def all_scenes(unseen: bool) -> list[Scene]:
    """Every scene whose colour-shape pair is (unseen=True) or is not (False) held out."""
    return [
        Scene(s, c, p, n)
        for s in SHAPES
        for c in COLOURS
        for p in PLACES
        for n in COUNTS
        if ((s, c) in UNSEEN_PAIRS) == unseen
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        t = max(1.5, r / 2.5)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """One picture of `scene` with random background, sizes, positions and noise."""
    background = tuple(int(v) for v in rng.integers(70, 186, size=3))
    img = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = PLACES[scene.place]
    base = np.array(COLOURS[scene.colour])
    radius = float(rng.uniform(3.5, 5.0))
    for _layout in range(1000):  # shapes must not touch, or "three" would look like "two"
        centres = [(rng.uniform(x0, x1), rng.uniform(y0, y1)) for _ in range(scene.count)]
        if all(math.dist(p, q) > 2 * radius + 2 for i, p in enumerate(centres) for q in centres[:i]):
            break
    else:
        raise RuntimeError(f"cannot place {scene.caption!r} without overlap")
    for cx, cy in centres:
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-20, 21, size=3), 0, 255))
        _draw_shape(draw, scene.shape, cx, cy, radius, fill)
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 10, size=(SIZE, SIZE, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_part(folder: Path, scenes: list[Scene], n: int, seed: int) -> Path:
    """Render `n` pictures of random scenes into folder/images + folder/captions.json."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        scene = scenes[int(rng.integers(len(scenes)))]
        name = f"{i:05d}.png"
        render(scene, rng).save(images / name, compress_level=1)
        entries.append({"image": name, "captions": [scene.caption]})
    path = folder / "captions.json"
    path.write_text(json.dumps(entries, indent=0))
    return path


def generate(root: Path, n_train: int = 4000, n_test: int = 500, n_unseen: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write the train, held-out (seen combinations) and unseen-combination parts under `root`."""
    seen, unseen = all_scenes(unseen=False), all_scenes(unseen=True)
    parts = {"train": (seen, n_train), "test": (seen, n_test), "unseen": (unseen, n_unseen)}
    return {
        name: write_part(root / name, scenes, n, seed * 1000 + k).parent
        for k, (name, (scenes, n)) in enumerate(parts.items())
    }
