"""The model's text tower as an ONNX file cached beside the index, so a cold query needs no torch.

A cold `loupe search` used to spend ~6 s importing torch and open_clip and building the model for
one sentence. The text tower, exported once (`export_text_tower`) and run by ONNX Runtime with a
torch-free tokenizer (`clip_tokenizer`), answers in well under a second. The export is checked
before it is used: the tokenizer must be open_clip's default CLIP tokenizer (same ids on probe
sentences), and the ONNX vectors must be within cosine `MIN_COSINE` of fp32 torch on probe
sentences (short, long, non-ASCII). A model that fails either (another tokenizer, an op the
exporter lacks) is recorded as not exportable, and searches keep using torch, without error.
Which searches use it is `loupe.indexer.models.factory`'s choice.

Files, beside the index's FAISS files: `text-tower.json` (the manifest: which weights, which
file, tokenizer settings; written last, atomically, so it only ever names complete files),
`text-<key>.onnx` + `.onnx.data` (the graph, its weights as external data, which ONNX Runtime
maps instead of parsing: 0.3 s instead of 1 s of session set-up for ViT-B-32) and
`text-<key>.bpe` (the BPE merges, uncompressed). The key names the weights, so replacing the
tower of an index rebuilt with another model never swaps a file under a reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from loupe.indexer.storage.locations import Location

MIN_COSINE = 0.9999  # ONNX against fp32 torch, on every probe sentence
FORMAT = 1  # bump when the exported graph or the manifest changes meaning
PROBES = (
    "a photo of a dog on the beach",
    "A black and white dog is running in a grassy garden surrounded by a white fence .",
    "café crème brûlée, 東京の夜景 🐶 “quoted” &amp; ＦＵＬＬ width",
    " ".join(["a very long caption that goes on"] * 20),  # longer than any context: truncated
)


def tower_enabled() -> bool:
    """`LOUPE_TEXT_TOWER=0` turns the cached tower off: searches load torch, nothing is exported."""
    return os.environ.get("LOUPE_TEXT_TOWER", "1") != "0"


def manifest_path(location: Location) -> Path:
    return location.vector_dir / f"{location.prefix}text-tower.json"


def _key(model: str, weights_id: str) -> str:
    return hashlib.sha256(f"{FORMAT}\n{model}\n{weights_id}".encode()).hexdigest()[:16]


def read_manifest(location: Location) -> dict | None:
    try:
        data = json.loads(manifest_path(location).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def cached_tower(location: Location, model: str, weights_id: str) -> dict | None:
    """The manifest of a usable tower for these weights (None: absent, stale, or not exportable)."""
    data = read_manifest(location)
    if data is None or (data.get("model"), data.get("weights_id")) != (model, weights_id) or not data.get("usable"):
        return None
    return data


def tower_state(location: Location, model: str, weights_id: str) -> str:
    """'ready', 'unusable' (tried: this model does not export), or 'absent'."""
    data = read_manifest(location)
    if data is None or (data.get("model"), data.get("weights_id")) != (model, weights_id):
        return "absent"
    return "ready" if data.get("usable") else "unusable"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _plain_clip_tokenizer(tokenizer) -> bool:
    """Whether `tokenizer` is open_clip's SimpleTokenizer with the settings `ClipTokenizer` implements."""
    from open_clip import tokenizer as oc

    return (
        type(tokenizer) is oc.SimpleTokenizer
        and getattr(tokenizer, "reduction_fn", None) is None
        and getattr(tokenizer, "clean_fn", None) is oc._clean_lower
        and len(tokenizer.encoder) == 49408
    )


def export_text_tower(encoder, location: Location, weights_id: str) -> dict:
    """Export `encoder`'s text tower beside the index and check it; returns the manifest written.

    `encoder` must hold fp32 weights (call before `set_text_precision`). Never raises for a model
    that cannot be exported: the manifest then says `usable: false` with the reason, and searches
    use torch. Costs one export (ViT-B-32: a few seconds), once per weights.
    """
    import time

    start = time.perf_counter()
    model_name = encoder.spec.model
    key = _key(model_name, weights_id)
    folder = location.vector_dir
    stem = f"{location.prefix}text-{key}"
    manifest = {"format": FORMAT, "model": model_name, "weights_id": weights_id, "usable": False}
    try:
        manifest.update(_export(encoder, folder, stem))
        manifest["usable"] = True
    except Exception as exc:  # any architecture or exporter failure: torch stays the text encoder
        manifest["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        for suffix in (".onnx", ".onnx.data", ".bpe"):
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)
    manifest["export_seconds"] = round(time.perf_counter() - start, 2)
    old = read_manifest(location)
    _write_json(manifest_path(location), manifest)
    if old and old.get("file") and old.get("file") != manifest.get("file"):  # another model's tower
        for suffix in ("", ".data"):
            (folder / f"{old['file']}{suffix}").unlink(missing_ok=True)
        if old.get("bpe"):
            (folder / old["bpe"]).unlink(missing_ok=True)
    return manifest


def _export(encoder, folder: Path, stem: str) -> dict:
    import copy
    import io
    import warnings

    import torch

    from loupe.indexer.models.clip_tokenizer import ClipTokenizer, default_bpe_path

    if encoder.device.type != "cpu":
        raise ValueError("the text tower is exported from a CPU model only")
    if not _plain_clip_tokenizer(encoder.tokenizer):
        raise ValueError(f"tokenizer {type(encoder.tokenizer).__name__} is not open_clip's default CLIP tokenizer")
    context = int(encoder.tokenizer.context_length)
    ours = ClipTokenizer(context)
    reference = encoder.tokenizer(list(PROBES)).numpy()
    if not np.array_equal(ours(list(PROBES)), reference):
        raise ValueError("loupe's tokenizer disagrees with the model's on the probe sentences")

    class TextTower(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            # the text side only: a lowered (int8) image tower in the traced module breaks the export
            text_only = copy.copy(model)
            text_only._modules = {k: v for k, v in model._modules.items() if k != "visual"}
            self.model = text_only

        def forward(self, tokens):
            return self.model.encode_text(tokens)

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # traced with grad enabled: under no_grad torch may pick fused attention kernels ONNX has no op for
    with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TextTower(encoder.model).eval(),
            (torch.from_numpy(reference[:2]),),
            buffer,
            input_names=["tokens"],
            output_names=["features"],
            dynamic_axes={"tokens": {0: "batch"}, "features": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    import onnx

    graph = onnx.load_from_string(buffer.getvalue())
    del buffer
    tmp = f".{stem}.{os.getpid()}.tmp"
    (folder / f"{stem}.onnx.data").unlink(missing_ok=True)  # onnx appends to an existing data file
    # the graph names its data file: the data is written first, the graph renamed into place last
    onnx.save_model(graph, str(folder / f"{tmp}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{stem}.onnx.data", size_threshold=1024)
    del graph
    os.replace(folder / f"{tmp}.onnx", folder / f"{stem}.onnx")
    from loupe.indexer.models.clip_tokenizer import read_merges

    merges = read_merges(default_bpe_path())
    (folder / f"{tmp}.bpe").write_text("\n".join(merges), encoding="utf-8")
    os.replace(folder / f"{tmp}.bpe", folder / f"{stem}.bpe")

    tower = OnnxTextTower(folder / f"{stem}.onnx", folder / f"{stem}.bpe", context)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(encoder.model.encode_text(torch.from_numpy(reference)).float(), dim=-1)
    got = tower.encode(list(PROBES))
    cosines = (got * expected.numpy()).sum(axis=1)
    if not np.all(cosines >= MIN_COSINE):
        raise ValueError(f"ONNX text vectors differ from torch (min cosine {cosines.min():.6f} < {MIN_COSINE})")
    return {
        "file": f"{stem}.onnx",
        "bpe": f"{stem}.bpe",
        "context_length": context,
        "dim": int(expected.shape[1]),
        "min_cosine": float(cosines.min()),
    }


class OnnxTextTower:
    """An exported text tower run by ONNX Runtime: sentences in, L2-normalised float32 rows out.

    The session is built in a background thread as soon as the object exists (ONNX Runtime
    releases the GIL while it loads), so a search can open its catalog meanwhile; the tokenizer,
    pure Python, is built by the first `encode` while the session may still be loading.
    """

    sessions_created = 0  # per process: lets tests see that a cached query built no session

    def __init__(self, path: Path, bpe: Path, context_length: int, background: bool = False) -> None:
        self.path, self.bpe, self.context_length = Path(path), Path(bpe), context_length
        self._session = None
        self._tokenizer = None
        self._error: BaseException | None = None
        # not a daemon: a process that exits (an error) while ONNX Runtime builds the session would abort
        self._thread = threading.Thread(target=self._load, name="loupe-text-tower") if background else None
        if self._thread is not None:
            try:  # imported here, holding the GIL alone, so that the session starts sooner
                import onnxruntime  # noqa: F401
            except ImportError:  # `_load` records it; the search then falls back to torch
                pass
            self._thread.start()

    def _load(self) -> None:
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # one query runs the graph once: the weights' pages are mapped and used as they are, not
            # repacked (~150 MB copied for ViT-B-32), nor the graph rewritten first. Session set-up
            # went from 0.25 s to 0.05 s CPU for 0.02 s more per run, at load ~8 (RESULTS.md)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.add_session_config_entry("session.disable_prepacking", "1")
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            OnnxTextTower.sessions_created += 1
        except BaseException as exc:  # reported to the caller of `encode`
            self._error = exc

    def ready(self) -> None:
        """Wait for the session; raises what loading raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._session is None and self._error is None:
            self._load()
        if self._error is not None:
            raise self._error

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if self._tokenizer is None:  # while the session loads in its thread
            from loupe.indexer.models.clip_tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer(self.context_length, str(self.bpe))
        self.ready()
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self._tokenizer(list(texts[start : start + batch_size]))
            feats = self._session.run(None, {"tokens": tokens})[0].astype(np.float32, copy=False)
            out.append(feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


_started: dict[Path, OnnxTextTower] = {}


def open_tower(location: Location, manifest: dict, background: bool = True) -> OnnxTextTower:
    """The tower a manifest names; one `start_tower` already began loading is handed over."""
    folder = location.vector_dir
    path = folder / manifest["file"]
    if path in _started:
        return _started.pop(path)
    return OnnxTextTower(path, folder / manifest["bpe"], int(manifest["context_length"]), background)


def start_tower(location: Location, manifest: dict) -> None:
    """Begin loading the tower a manifest names, for `open_tower` to hand over (`factory.prestart`)."""
    path = location.vector_dir / manifest["file"]
    if path not in _started:  # begun already (`loupe.cli.search_entry` starts it first thing)
        _started[path] = OnnxTextTower(path, location.vector_dir / manifest["bpe"], int(manifest["context_length"]), background=True)
