"""The model's identity: one frozen `ModelSpec`, made from options in one place and compared in one place.

A spec names the weights (an open_clip config plus a pretrained tag or a local checkpoint) and
how each tower runs: its backend (`onnx` or `torch`, each tower; 'auto' until the factory
chooses for the machine) and its precision. `resolve_spec` is the only place where --model/--pretrained/--checkpoint and an
index's recorded model become a spec; `check_bound` is the only place a spec is compared with
the model an index was built with, `ModelSpec.answers` the only place two specs are compared.
Nothing here loads a model: a checkpoint is at most hashed (`weights_id_of`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loupe.indexer.errors import LoupeError

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
CONFIG_DIR = Path(__file__).parent / "configs"
TEXT_BACKENDS = ("auto", "onnx", "torch")  # auto: the index's exported ONNX tower where it may run, else torch
IMAGE_BACKENDS = ("auto", "onnx", "torch")  # auto: the factory's choice per machine (`factory.image_backend`)

_registered = False


def register_model_configs() -> None:
    """Make loupe's bundled model configs (e.g. `loupe-tiny`) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class ModelSpec:
    """What names a model (config plus tag or file) and how its towers run.

    `dim` is known once an index or a loaded model says it; it does not take part in equality.
    Precisions are a choice ('auto' and the names of `loupe.indexer.models.precision`) until the
    factory resolves them for a device: an encoder's `spec` says what it runs.
    """

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: str | None = None
    text_backend: str = "auto"
    image_backend: str = "auto"
    text_precision: str = "auto"
    image_precision: str = "auto"
    dim: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.text_backend not in TEXT_BACKENDS:
            raise LoupeError(f"unknown text backend '{self.text_backend}': use {', '.join(TEXT_BACKENDS)}")
        if self.image_backend not in IMAGE_BACKENDS:
            raise LoupeError(f"unknown image backend '{self.image_backend}': use {', '.join(IMAGE_BACKENDS)}")

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short human-readable name, e.g. 'ViT-B-32/laion2b_s34b_b79k'."""
        if self.checkpoint:
            return f"{self.model} (checkpoint {self.checkpoint})"
        if self.pretrained:
            return f"{self.model}/{self.pretrained}"
        return f"{self.model} (random weights)"

    def describe_bound(self) -> str:
        """How an index's binding reads in messages (same wording as the catalog check's)."""
        return self.describe() if (self.checkpoint or self.pretrained) else self.model

    @property
    def weights_id(self) -> str:
        """The pretrained tag, or 'sha256:<hex>' of the checkpoint file (hashed once per file state)."""
        return weights_id_of(self)

    def answers(self, asked: "ModelSpec") -> bool:
        """Whether an encoder running this spec answers for `asked`: the very weights (the same
        name, tag or file path: nothing hashed), and each backend and precision `asked` names
        ('auto': any)."""
        if (self.model, self.pretrained, self.checkpoint) != (asked.model, asked.pretrained, asked.checkpoint):
            return False
        chosen = ("text_backend", "image_backend", "text_precision", "image_precision")
        return all(getattr(asked, f) in ("auto", getattr(self, f)) for f in chosen)


def spec_of_meta(meta) -> ModelSpec | None:
    """The model an index is bound to, as its catalog records it (its checkpoint file may have moved since)."""
    if meta is None:
        return None
    return ModelSpec(model=meta.model, pretrained=meta.pretrained, checkpoint=meta.checkpoint_path, dim=meta.dim)


def binding_record(spec: ModelSpec, weights_id: str, dim: int) -> dict:
    """The catalog's record of a new index's model (`Catalog.create_meta`'s arguments)."""
    st = os.stat(spec.checkpoint) if spec.checkpoint else None
    return dict(
        model=spec.model, pretrained=spec.pretrained, checkpoint_path=spec.checkpoint,
        checkpoint_size=st.st_size if st else None, checkpoint_mtime_ns=st.st_mtime_ns if st else None,
        weights_id=weights_id, dim=dim,
    )


def check_bound(meta, spec: ModelSpec, dim: int, weights_id: Callable[[], str] | None = None) -> None:
    """Refuse `spec` (making vectors of `dim`) unless it is the model the index `meta` was built with.

    The architecture name decides the dimension, so names, dimension and weights are compared; a
    checkpoint that is the recorded file (same path, size and mtime) is not even hashed.
    `weights_id` gives the weights id when it is needed (default: `spec.weights_id`).
    """
    asked = spec.describe()
    built = spec_of_meta(meta).describe_bound()
    if spec.model != meta.model or dim != meta.dim:
        raise LoupeError(
            f"this index was built with {built}, not {asked}: use that model, or another --home/--db for a new index"
        )
    weights_id = weights_id or (lambda: spec.weights_id)
    if spec.checkpoint:
        st = os.stat(spec.checkpoint)
        same_file = (
            spec.checkpoint == meta.checkpoint_path
            and st.st_size == meta.checkpoint_size
            and st.st_mtime_ns == meta.checkpoint_mtime_ns
        )
        weights = meta.weights_id if same_file else weights_id()  # hash only when needed
    else:
        weights = weights_id()
    if weights != meta.weights_id:
        raise LoupeError(
            f"this index was built with {built} ({meta.weights_id[:19]}), but {asked} has other weights "
            f"({weights[:19]}): use the same weights, or another --home/--db"
        )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, used to bind an index to the exact checkpoint that built it."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_id_of(spec: ModelSpec) -> str:
    """The pretrained tag, 'sha256:<hex>' of the checkpoint file, or 'random'; loads no model."""
    if spec.checkpoint:
        return f"sha256:{file_sha256(spec.checkpoint)}"
    return spec.pretrained or "random"


def model_name_from_checkpoint(path: str) -> str | None:
    """Read the model name loupe stores in its own checkpoints (None for foreign files).

    A file whose image tower is cached (`image_tower.checkpoint_model`, by its hash) is answered
    from the tower's manifest, without torch; else torch's memory-mapped loading reads it, so only
    the small metadata entry is actually read.
    """
    from loupe.indexer.models.image_tower import checkpoint_model

    try:
        known, name = checkpoint_model(f"sha256:{file_sha256(path)}")
    except OSError:
        known, name = False, None
    if known:
        return name
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("model_name"), str):
        return obj["model_name"]
    return None


def make_spec(model: str | None, pretrained: str | None, checkpoint: str | Path | None) -> ModelSpec:
    """`resolve_spec` for a command without an index."""
    return resolve_spec(model, pretrained, checkpoint)


def resolve_spec(
    model: str | None,
    pretrained: str | None,
    checkpoint: str | Path | None,
    bound: ModelSpec | None = None,
    *,
    allow_random: bool = False,
    check_tags: bool = True,
) -> ModelSpec:
    """The one place where --model/--pretrained/--checkpoint and the index's model become a spec.

    `bound` is the model the index was built with (None: no index yet). No option means the
    index's model, else ViT-B-32/laion2b_s34b_b79k. A checkpoint supplies its recorded model
    name (a file that records none takes --model, else the index's model); --model must agree
    with it. --pretrained needs --model, unless the index's model has that tag. --model alone
    means the index's model when it names it, ViT-B-32's default tag, or random weights only
    where `allow_random` (loupe train from a config). Options naming another model than the
    index's are refused here, before any weights load. `check_tags=False` skips importing
    open_clip to check a tag (the server client, shard import), knowing only the index's own tag.
    """
    if checkpoint is not None and str(checkpoint) != "":
        if pretrained:
            raise LoupeError("pass either --pretrained or --checkpoint, not both")
        checkpoint = str(Path(checkpoint).expanduser().resolve())
        if not os.path.isfile(checkpoint):
            raise LoupeError(f"checkpoint file not found: {checkpoint}")
        if bound is not None and checkpoint == bound.checkpoint:
            recorded = bound.model  # the file the index was built from: known to hold its model
        else:
            recorded = model_name_from_checkpoint(checkpoint)
        if model is not None and recorded is not None and model != recorded:
            raise LoupeError(f"{checkpoint} records model {recorded}, not {model}: drop --model or pass another file")
        model = model or recorded or (bound.model if bound is not None else None)
        if model is None:
            raise LoupeError(f"{checkpoint} does not record its model name: pass --model (e.g. --model ViT-B-32)")
        spec = ModelSpec(model=model, pretrained=None, checkpoint=checkpoint)
    elif pretrained:
        if model is None:
            if bound is None or not _has_tag(bound.model, pretrained, bound, check_tags):
                owner = f" (not a tag of this index's model {bound.model})" if bound is not None else ""
                raise LoupeError(f"--pretrained {pretrained} needs --model{owner}, e.g. --model ViT-B-32 --pretrained {pretrained}")
            model = bound.model
        elif check_tags and not _has_tag(model, pretrained, bound, check_tags):
            tags = _pretrained_tags(model)
            if tags is not None:  # an unknown model name is load_encoder's error
                hint = ", ".join(tags[:6]) or "none: train one with `loupe train` or pass --checkpoint"
                raise LoupeError(f"'{pretrained}' is not a pretrained tag of {model} (known: {hint})")
        spec = ModelSpec(model=model, pretrained=pretrained, checkpoint=None)
    elif model is not None:
        if bound is not None and model == bound.model:
            spec = bound
        elif model == DEFAULT_MODEL:
            spec = ModelSpec(model=model, pretrained=DEFAULT_PRETRAINED, checkpoint=None)
        elif allow_random or bound is not None:  # with an index, the binding check below speaks
            spec = ModelSpec(model=model, pretrained=None, checkpoint=None)
        else:
            if _pretrained_tags(model) is None:
                raise LoupeError(f"unknown model '{model}': `loupe models` lists the names open_clip knows")
            raise LoupeError(
                f"--model {model} names an architecture, not weights: add --pretrained TAG "
                "(`loupe models` lists them) or --checkpoint FILE"
            )
    elif bound is not None:
        if bound.checkpoint and not os.path.isfile(bound.checkpoint):
            raise LoupeError(
                f"this index was built with checkpoint {bound.checkpoint}, which no longer exists: pass --checkpoint FILE"
            )
        return bound
    else:
        spec = ModelSpec()
    if bound is not None and (
        spec.model != bound.model or (not spec.checkpoint and (spec.pretrained != bound.pretrained or bound.checkpoint))
    ):
        raise LoupeError(
            f"this index was built with {bound.describe_bound()}, not {spec.describe()}: "
            "use that model, or another --home/--db for a new index"
        )
    return spec if bound is None else spec.replace(dim=bound.dim)


def _pretrained_tags(model: str) -> list[str] | None:
    """open_clip's pretrained tags for `model` (None: a name open_clip does not know)."""
    import open_clip

    register_model_configs()
    if model not in open_clip.list_models():
        return None
    return list(open_clip.list_pretrained_tags_by_model(model))


def _has_tag(model: str, tag: str, bound: ModelSpec | None, check_tags: bool) -> bool:
    if bound is not None and (model, tag) == (bound.model, bound.pretrained):
        return True
    return check_tags and tag in (_pretrained_tags(model) or [])
