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

Exported once per model, not per index: the export and its check are kept in the user's cache
folder (`image_tower.cache_dir()`, `text-<key>.*` with its manifest), and an index of the same
weights gets hard links to those files (copies across file systems) in well under a second.
CLIP towers are exported with a dynamic sequence length (`encoder.encode_text_prefix`): a query
runs over its own tokens up to the end-of-text, not 77 positions (a 6-word query: 8).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from loupe.indexer.models.clip_tokenizer import BpeTable
from loupe.indexer.models.onnx_export import check_agreement, export_graph, failure_reason, write_json
from loupe.indexer.storage.locations import Location

BATCH = 64  # sentences per run of the graph
MIN_COSINE = 0.9999  # ONNX against fp32 torch, on every probe sentence
FORMAT = 2  # bump when the exported graph or the manifest changes meaning (2: dynamic sequence length)
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


def cache_record(model: str, weights_id: str) -> dict | None:
    """The user cache's record of these weights' text tower export (usable or not), None if none:
    what `export_text_tower` installs without an export."""
    from loupe.indexer.models.image_tower import cache_dir

    return _read_record(cache_dir(), f"text-{_key(model, weights_id)}")


def _read_record(cache: Path, cstem: str) -> dict | None:
    try:
        data = json.loads((cache / f"{cstem}.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        return None
    if data.get("usable") and not all((cache / f"{cstem}{x}").exists() for x in (".onnx", ".onnx.data", ".bpe")):
        return None  # files removed from the cache: export again
    return data


def _plain_clip_tokenizer(tokenizer) -> bool:
    """Whether `tokenizer` is open_clip's SimpleTokenizer with the settings `ClipTokenizer` implements."""
    from open_clip import tokenizer as oc

    return (
        type(tokenizer) is oc.SimpleTokenizer
        and getattr(tokenizer, "reduction_fn", None) is None
        and getattr(tokenizer, "clean_fn", None) is oc._clean_lower
        and len(tokenizer.encoder) == 49408
    )


def export_text_tower(encoder, location: Location, weights_id: str, export: bool = True) -> dict | None:
    """Give the index the text tower of `encoder`'s weights, checked; returns the manifest written.

    The tower comes from the per-model cache when an earlier run exported it, else it is exported
    there first (`encoder` must hold fp32 weights: call before `set_text_precision`); with
    `export=False` (an encoder without a text side), None when the cache has none. Never raises
    for a model that cannot be exported: the manifest then says `usable: false` with the reason,
    and searches use torch. An index folder that cannot be written raises OSError.
    """
    import time

    from loupe.indexer.models.image_tower import cache_dir

    start = time.perf_counter()
    model_name = encoder.spec.model
    key = _key(model_name, weights_id)
    folder = location.vector_dir
    stem = f"{location.prefix}text-{key}"
    manifest = {"format": FORMAT, "model": model_name, "weights_id": weights_id, "usable": False}
    cache, cstem = cache_dir(), f"text-{key}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # no cache folder: the export lives beside the index only, as before
        cache, cstem = folder, stem
    if not export and _read_record(cache, cstem) is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    cached = _cached_export(encoder, cache, cstem, weights_id, export)
    if cached is None:
        return None
    if cached.get("usable"):
        manifest.update(_install(cache, cstem, folder, stem, cached))
        manifest["usable"] = True
    else:
        manifest["reason"] = cached.get("reason", "not exportable")
    manifest["export_seconds"] = round(time.perf_counter() - start, 2)
    old = _raw_manifest(location)
    write_json(manifest_path(location), manifest)
    if old and old.get("file") and old.get("file") != manifest.get("file"):  # another model's (or format's) tower
        for suffix in ("", ".data"):
            (folder / f"{old['file']}{suffix}").unlink(missing_ok=True)
        if old.get("bpe"):
            for suffix in ("", BpeTable.SUFFIX):  # the merges and the tokenizer's table
                (folder / f"{old['bpe']}{suffix}").unlink(missing_ok=True)
    return manifest


def _raw_manifest(location: Location) -> dict | None:
    try:
        data = json.loads(manifest_path(location).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached_export(encoder, cache: Path, cstem: str, weights_id: str, export: bool = True) -> dict | None:
    """The cache's record of this model's export (made now if absent and `export`, one process at a time)."""
    import fcntl

    record = cache / f"{cstem}.json"
    data = _read_record(cache, cstem)
    if data is not None or not export:
        return data
    with open(cache / f".{cstem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process exporting the same model: wait for it
        data = _read_record(cache, cstem)
        if data is not None:
            return data
        data = {"format": FORMAT, "model": encoder.spec.model, "weights_id": weights_id, "usable": False}
        try:
            data.update(_export(encoder, cache, cstem))
            data["usable"] = True
        except Exception as exc:  # any architecture or exporter failure: torch stays the text encoder
            data["reason"] = failure_reason(exc)
            for suffix in (".onnx", ".onnx.data", ".bpe"):
                (cache / f"{cstem}{suffix}").unlink(missing_ok=True)
        write_json(record, data)
        return data


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content: a hard link where the file system allows, else a copy; atomic."""
    import shutil

    if src == dst:
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _install(cache: Path, cstem: str, folder: Path, stem: str, cached: dict) -> dict:
    """The cached tower's files beside the index under `stem`; the manifest's file fields."""
    _link_or_copy(cache / f"{cstem}.onnx.data", folder / f"{stem}.onnx.data")
    _link_or_copy(cache / f"{cstem}.bpe", folder / f"{stem}.bpe")
    _build_table(folder / f"{stem}.bpe")
    if stem == cstem:
        _link_or_copy(cache / f"{cstem}.onnx", folder / f"{stem}.onnx")
    else:  # the graph names its data file: a small copy of the graph naming the index's
        import onnx

        graph = onnx.load(str(cache / f"{cstem}.onnx"), load_external_data=False)
        for tensor in graph.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = f"{stem}.onnx.data"
        tmp = folder / f".{stem}.{os.getpid()}.tmp.onnx"
        onnx.save_model(graph, str(tmp))
        os.replace(tmp, folder / f"{stem}.onnx")
    fields = ("context_length", "dim", "min_cosine", "dynamic_length")
    return {"file": f"{stem}.onnx", "bpe": f"{stem}.bpe", **{k: cached[k] for k in fields if k in cached}}


def _build_table(bpe: Path) -> None:
    """The tokenizer's lookup table beside the tower's merges file (a search makes it if this cannot)."""
    import sqlite3

    try:
        BpeTable.build(str(bpe))
    except (OSError, sqlite3.Error):
        pass


def _export(encoder, folder: Path, stem: str) -> dict:
    import copy

    import torch

    from loupe.indexer.models.clip_tokenizer import ClipTokenizer, default_bpe_path, read_merges

    if encoder.device.type != "cpu":
        raise ValueError("the text tower is exported from a CPU model only")
    if not _plain_clip_tokenizer(encoder.tokenizer):
        raise ValueError(f"tokenizer {type(encoder.tokenizer).__name__} is not open_clip's default CLIP tokenizer")
    context = int(encoder.tokenizer.context_length)
    ours = ClipTokenizer(context)
    reference = encoder.tokenizer(list(PROBES)).numpy()
    if not np.array_equal(ours(list(PROBES)), reference):
        raise ValueError("loupe's tokenizer disagrees with the model's on the probe sentences")

    dynamic = _traceable_blocks(encoder.model)

    class TextTower(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            # the text side only: a lowered (int8) image tower in the traced module breaks the export
            text_only = copy.copy(model)
            text_only._modules = {k: v for k, v in model._modules.items() if k != "visual"}
            self.model = text_only

        def forward(self, tokens):
            # a CLIP tower runs over the tokens given, as many as the query has (dynamic axis 1)
            return _encode_any_length(self.model, tokens) if dynamic else self.model.encode_text(tokens)

    folder.mkdir(parents=True, exist_ok=True)
    length_axes = {0: "batch", 1: "length"} if dynamic else {0: "batch"}
    export_graph(TextTower(encoder.model), (torch.from_numpy(reference[:2]),), folder, stem, ["tokens"],
                 {"tokens": length_axes, "features": {0: "batch"}})
    tmp = folder / f".{stem}.{os.getpid()}.tmp.bpe"
    tmp.write_text("\n".join(read_merges(default_bpe_path())), encoding="utf-8")
    os.replace(tmp, folder / f"{stem}.bpe")

    tower = OnnxTextTower(folder / f"{stem}.onnx", folder / f"{stem}.bpe", context, dynamic=dynamic)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(encoder.model.encode_text(torch.from_numpy(reference)).float(), dim=-1)
    got = tower.encode(list(PROBES))  # one batch, as long as its longest sentence
    alone = np.concatenate([tower.encode([p]) for p in PROBES])  # each at its own length
    cosines = np.minimum((got * expected.numpy()).sum(axis=1), (alone * expected.numpy()).sum(axis=1))
    check_agreement(cosines, MIN_COSINE, "text")
    return {
        "file": f"{stem}.onnx",
        "bpe": f"{stem}.bpe",
        "context_length": context,
        "dim": int(expected.shape[1]),
        "min_cosine": float(cosines.min()),
        "dynamic_length": dynamic,
    }


def _traceable_blocks(model) -> bool:
    """Whether `_encode_any_length` computes `model`'s text tower: a CLIP tower (causal, pooled at
    the end-of-text) of open_clip's plain residual attention blocks."""
    from loupe.indexer.models.encoder import prefix_encodable

    try:
        from open_clip.transformer import ResidualAttentionBlock
        import torch
    except ImportError:
        return False
    if not prefix_encodable(model):
        return False
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if not blocks:
        return False
    return all(
        type(b).forward is ResidualAttentionBlock.forward
        and type(b).attention is ResidualAttentionBlock.attention
        and not hasattr(b, "ln_1_kv")
        and isinstance(b.attn, torch.nn.MultiheadAttention)
        and b.attn.in_proj_weight is not None
        and b.attn._qkv_same_embed_dim
        for b in blocks
    )


def _encode_any_length(model, tokens):
    """`encode_text_prefix` written so that a trace keeps the length and batch axes dynamic.

    torch's MultiheadAttention reshapes with the traced length as a constant; here the same
    arithmetic (the block's own weights, open_clip's ResidualAttentionBlock order) reshapes only
    by the head sizes. Checked against torch fp32 on the probes at export.
    """
    import torch

    n = tokens.shape[1]
    ends = tokens.argmax(dim=-1) if model.text_pool_type == "argmax" else (tokens == model.text_eos_id).int().argmax(dim=-1)
    x = model.token_embedding(tokens) + model.positional_embedding[:n]
    mask = model.attn_mask[:n, :n]
    for block in model.transformer.resblocks:
        attn = block.attn
        heads = attn.num_heads
        head_dim = attn.embed_dim // heads
        q, k, v = torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))  # (N, heads, n, head_dim)
        weights = ((q * head_dim**-0.5) @ k.transpose(-1, -2) + mask).softmax(dim=-1)
        out = attn.out_proj((weights @ v).transpose(1, 2).flatten(2))
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), ends]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


class OnnxTextTower:
    """An exported text tower run by ONNX Runtime: sentences in, L2-normalised float32 rows out.

    With `background`, a thread builds the tokenizer and the session as soon as the object exists
    (ONNX Runtime releases the GIL while it loads and runs), so a search opens its catalog
    meanwhile; given the query's sentences (`ahead`), the thread also encodes them, and `encode`
    of those sentences only collects the rows.
    """

    sessions_created = 0  # per process: lets tests see that a cached query built no session

    def __init__(self, path: Path, bpe: Path, context_length: int, background: bool = False, dynamic: bool = False,
                 ahead: Sequence[str] = (), long_lived: bool = False) -> None:
        self.path, self.bpe, self.context_length = Path(path), Path(bpe), context_length
        self.long_lived = long_lived  # many runs (`loupe serve`): a session optimised for them
        self.dynamic = dynamic  # the graph takes any length: tokens are cut after the last end-of-text
        self._session = None
        self._tokenizer = None
        self._error: BaseException | None = None
        self._ahead: tuple[tuple[str, ...], np.ndarray] | None = None
        self._ahead_texts = tuple(ahead)[:BATCH] if background else ()
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

            from loupe.indexer.models.clip_tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer(self.context_length, str(self.bpe))
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if not self.long_lived:
                # one query runs the graph once: the weights' pages are mapped and used as they are, not
                # repacked (~150 MB copied for ViT-B-32), nor the graph rewritten first. Session set-up
                # went from 0.25 s to 0.05 s CPU for 0.02 s more per run, at load ~8 (RESULTS.md)
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                options.add_session_config_entry("session.disable_prepacking", "1")
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            OnnxTextTower.sessions_created += 1
            if self._ahead_texts:
                self._ahead = (self._ahead_texts, self._run(self._ahead_texts))
            elif self._thread is not None:
                self._warm_up()
        except BaseException as exc:  # reported to the caller of `encode`
            self._error = exc

    def _warm_up(self) -> None:
        """One run on a blank row in the loading thread (no sentence known yet, e.g. `loupe serve`): the
        first run maps the weights' pages and sets ONNX Runtime's kernels up, which the first query
        would otherwise pay."""
        try:
            self._session.run(None, {"tokens": np.zeros((1, 2 if self.dynamic else self.context_length), dtype=np.int64)})
        except Exception:  # the query's own run reports what is wrong
            pass

    def ready(self) -> None:
        """Wait for the session; raises what loading raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._session is None and self._error is None:
            self._load()
        if self._error is not None:
            raise self._error

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self._tokenizer(list(texts))
        if self.dynamic:  # padding (id 0) after every row's end-of-text changes nothing: not run
            used = tokens != 0
            tokens = np.ascontiguousarray(tokens[:, : int((used.shape[1] - np.argmax(used[:, ::-1], axis=1)).max())])
        feats = self._session.run(None, {"tokens": tokens})[0].astype(np.float32, copy=False)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def encode(self, texts: Sequence[str], batch_size: int = BATCH) -> np.ndarray:
        self.ready()
        texts = list(texts)
        if self._ahead is not None:
            done, self._ahead = self._ahead, None
            if done[0] == tuple(texts):  # encoded while the search opened its catalog
                return done[1]
        out = [self._run(texts[start : start + batch_size]) for start in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


_started: dict[Path, OnnxTextTower] = {}


def open_tower(location: Location, manifest: dict, background: bool = True, long_lived: bool = False) -> OnnxTextTower:
    """The tower a manifest names; one `start_tower` already began loading is handed over (one-off)."""
    folder = location.vector_dir
    path = folder / manifest["file"]
    if path in _started and not long_lived:
        return _started.pop(path)
    return OnnxTextTower(path, folder / manifest["bpe"], int(manifest["context_length"]), background,
                         bool(manifest.get("dynamic_length")), long_lived=long_lived)


def start_tower(location: Location, manifest: dict, ahead: Sequence[str] = ()) -> None:
    """Begin loading the tower a manifest names, and encoding the sentences `ahead`, for `open_tower`
    to hand over (`factory.prestart`)."""
    path = location.vector_dir / manifest["file"]
    if path not in _started:  # begun already (`loupe.cli.search_entry` starts it first thing)
        _started[path] = OnnxTextTower(path, location.vector_dir / manifest["bpe"], int(manifest["context_length"]),
                                       background=True, dynamic=bool(manifest.get("dynamic_length")), ahead=ahead)
