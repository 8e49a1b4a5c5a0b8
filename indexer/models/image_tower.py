"""The model's image tower as an ONNX file, exported once per model and run by ONNX Runtime in fp32.

On CPUs without bf16 units torch's fp32 ViT is the slowest faithful way to embed a photo: ONNX
Runtime runs the very same fp32 graph about 1.9x faster (benchmarks/RESULTS.md, "Backends"). The
export is done once per weights and kept in the user's cache folder (`cache_dir()`), keyed by the
model name, the weights id and `FORMAT`, so every index of that model reuses it. It is checked
before use: its vectors on probe pixels must be within cosine `MIN_COSINE` of torch fp32; a model
that fails (an op the exporter lacks, a graph that strays) is recorded as unusable with the reason,
and torch embeds its images, said once. Which runs, is `loupe.indexer.models.factory`'s choice.

Files, in `cache_dir()`: `image-<key>.json` (the manifest, written last and atomically, so it only
ever names complete files), `image-<key>.onnx` and `image-<key>.onnx.data` (its weights). The
manifest also records what a run without torch needs to use the tower alone
(`loupe.indexer.models.onnx_images`): the model's eval transform (`preprocess.transform_record`),
the ONNX Runtime version that passed the check, and the model name a checkpoint file records.
Concurrent exports of one model (two indexes at once) take a file lock: one exports, the other waits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from loupe.indexer.models.onnx_export import check_agreement, export_graph, failure_reason, write_json

MIN_COSINE = 0.9999  # ONNX against torch fp32, on probe pixels and on each run's first photos
FORMAT = 2  # bump when the exported graph or the manifest changes meaning (2: preprocess, onnxruntime, checkpoint_model)


class TowerUnavailable(Exception):
    """The ONNX image tower cannot serve this model here (the reason is the message)."""


def cache_dir() -> Path:
    """Where exported towers live: `LOUPE_CACHE_DIR`, else `$XDG_CACHE_HOME/loupe`, else ~/.cache/loupe."""
    env = os.environ.get("LOUPE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loupe"


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported (an import that fails counts as absent)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def key(model: str, weights_id: str, image_size: int) -> str:
    return hashlib.sha256(f"{FORMAT}\n{model}\n{weights_id}\n{image_size}".encode()).hexdigest()[:16]


def probe_pixels(image_size: int, n: int = 4) -> np.ndarray:
    """Deterministic probe batch: smooth gradients plus noise, in the normalised range photos take."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(-1.5, 1.5, image_size, dtype=np.float32)
    base = ramp[None, None, :, None] * ramp[None, None, None, :]
    return (base + rng.normal(0, 0.6, (n, 3, image_size, image_size))).astype(np.float32)


def read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def manifests(weights_id: str, folder: Path | None = None) -> Iterator[tuple[Path, dict]]:
    """The cached image towers' manifests (this `FORMAT`) of the weights `weights_id`, any model."""
    folder = Path(folder) if folder is not None else cache_dir()
    try:
        paths = sorted(folder.glob("image-*.json"))
    except OSError:
        return
    for path in paths:
        data = read_manifest(path)
        if data is not None and data.get("weights_id") == weights_id:
            yield path, data


def checkpoint_model(weights_id: str, folder: Path | None = None) -> tuple[bool, str | None]:
    """(known, name): the model name the checkpoint file of `weights_id` records (None: it records
    none), as an export of its tower read it; known is False when no cached tower says."""
    for _, data in manifests(weights_id, folder):
        if "checkpoint_model" in data:
            name = data["checkpoint_model"]
            return True, name if isinstance(name, str) else None
    return False, None


def load_tower(encoder, folder: Path | None = None, checkpoint_model: Callable[[], str | None] = lambda: None) -> "OnnxImageTower":
    """The ONNX image tower of `encoder`'s weights (a torch fp32 CPU encoder), exported on first need.

    `checkpoint_model` gives the model name the encoder's checkpoint file records, for the
    manifest. Raises `TowerUnavailable` with the reason when ONNX Runtime is absent, the folder
    cannot be written, or this model does not export faithfully (remembered: not tried again).
    """
    if not onnxruntime_available():
        raise TowerUnavailable("onnxruntime is not installed")
    folder = Path(folder) if folder is not None else cache_dir()
    stem = f"image-{key(encoder.spec.model, encoder.weights_id, encoder.image_size)}"
    manifest_path = folder / f"{stem}.json"
    manifest = read_manifest(manifest_path)
    if manifest is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            import fcntl

            with open(folder / f".{stem}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process exporting the same model: wait for it
                manifest = read_manifest(manifest_path) or _export_checked(encoder, folder, stem, manifest_path, checkpoint_model)
        except OSError as exc:
            raise TowerUnavailable(f"cannot write the tower cache {folder}: {exc}") from None
    if not manifest.get("usable"):
        raise TowerUnavailable(manifest.get("reason", "not exportable"))
    try:
        return OnnxImageTower(folder / manifest["file"], float(manifest["min_cosine"]))
    except Exception as exc:  # a damaged or removed file: torch embeds, the next export replaces it
        manifest_path.unlink(missing_ok=True)
        raise TowerUnavailable(f"cannot load {folder / manifest['file']}: {type(exc).__name__}") from None


def _export_checked(encoder, folder: Path, stem: str, manifest_path: Path, checkpoint_model: Callable[[], str | None]) -> dict:
    import time

    import onnxruntime

    from loupe.indexer.models.preprocess import transform_record

    start = time.perf_counter()
    manifest = {"format": FORMAT, "model": encoder.spec.model, "weights_id": encoder.weights_id,
                "image_size": encoder.image_size, "usable": False,
                "preprocess": transform_record(encoder.preprocess), "onnxruntime": onnxruntime.__version__}
    if encoder.spec.checkpoint:
        manifest["checkpoint_model"] = checkpoint_model()
    try:
        manifest.update(_export(encoder, folder, stem))
        manifest["usable"] = True
    except Exception as exc:  # any architecture or exporter failure: torch stays the image encoder
        manifest["reason"] = failure_reason(exc)
        for suffix in (".onnx", ".onnx.data"):
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)
    manifest["export_seconds"] = round(time.perf_counter() - start, 2)
    write_json(manifest_path, manifest)
    return manifest


def _export(encoder, folder: Path, stem: str) -> dict:
    import torch

    if encoder.device.type != "cpu":
        raise ValueError("the image tower is exported from a CPU model only")
    visual = encoder._fp32_visual or encoder.model.visual  # fp32 weights, whatever runs now

    class ImageTower(torch.nn.Module):
        def __init__(self, visual) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, pixels):
            return self.visual(pixels)

    probe = probe_pixels(encoder.image_size)
    export_graph(ImageTower(visual), (torch.from_numpy(probe[:2]),), folder, stem, ["pixels"],
                 {"pixels": {0: "batch"}, "features": {0: "batch"}})
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(visual(torch.from_numpy(probe)).float(), dim=-1).numpy()
    got = OnnxImageTower(folder / f"{stem}.onnx", 1.0).encode(probe)
    cosines = (got * expected).sum(axis=1)
    check_agreement(cosines, MIN_COSINE, "image")
    return {"file": f"{stem}.onnx", "dim": int(expected.shape[1]), "min_cosine": float(cosines.min())}


class OnnxImageTower:
    """An exported image tower run by ONNX Runtime: preprocessed pixels in, L2-normalised float32 rows out."""

    def __init__(self, path: Path, min_cosine: float) -> None:
        import onnxruntime as ort

        self.path, self.min_cosine = Path(path), min_cosine
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # decode threads share the cores: no spinning while they run
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def encode(self, pixels) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(pixels, dtype=np.float32))
        feats = self.session.run(None, {"pixels": x})[0].astype(np.float32, copy=False)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
