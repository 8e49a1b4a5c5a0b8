"""Encoders for a `ModelSpec`: the one place that chooses each tower's backend.

open_clip keeps one `create_model`; Immich's machine-learning service one model session per model
type. Here:

- `index_encoder(spec)`: what embeds an index's photos and captions: torch for text and captions;
  images on the backend `image_backend` chooses for the machine (ONNX Runtime fp32 on CPUs, its
  tower exported once per model into the user cache: `loupe.indexer.models.image_tower`; torch on
  GPUs, for bf16/int8, or where ONNX Runtime is missing); a Ray actor given the same spec runs the
  same arithmetic. For a run that embeds images only (`images_for`: `loupe index` in this process),
  with ONNX chosen and everything cached (`torch_free_encoder`), an encoder without torch.
- `query_encoder(location, meta, spec)`: what turns a query into vectors. Its text side is the
  index's exported ONNX tower (`loupe.indexer.models.text_tower`, fp32, no torch) for a one-off
  CPU search whose spec allows it, else torch; images always go through torch.
- `prestart`: begins loading that ONNX tower before the catalog is open (a cold search).
- `cache_text_tower`: exports a torch encoder's text tower for later cold searches.

The query cache (`loupe.indexer.models.query_cache`) is read once per search: `prestart`, the
choice here and the search's own lookup share one in-process cache object.
"""

from __future__ import annotations

from typing import Callable, Sequence

from loupe.indexer.models import precision as precisions
from loupe.indexer.models.spec import ModelSpec
from loupe.indexer.storage.locations import Location


def image_backend(spec: ModelSpec, device: "torch.device | str") -> tuple[str, str | None]:
    """The backend of the image tower for `spec` on `device` (or its type's name), and a note when the one asked for cannot run.

    'auto' is the fastest faithful one measured (benchmarks/RESULTS.md, "Backends"):
    - CUDA (and MPS): torch, in the spec's precision (fp16 mixed precision by default on CUDA);
    - CPU: ONNX Runtime fp32 (vectors within cosine 0.9999; no torch once cached: `torch_free_encoder`);
      a large run on a CPU with bf16 units takes torch with bf16 weights instead (`bulk_spec`);
    - torch, when ONNX Runtime is not installed (said once: the note).
    An explicit bf16/int8 precision is a torch arithmetic; `onnx` with one is refused.
    """
    from loupe.indexer.errors import LoupeError
    from loupe.indexer.models.image_tower import onnxruntime_available

    asked, precision = spec.image_backend, spec.image_precision
    if asked == "torch":
        return "torch", None
    if precision not in ("auto", "fp32"):
        if asked == "onnx":
            raise LoupeError(f"--backend onnx runs fp32 only, not --precision {precision}: drop one of them")
        return "torch", None
    kind = getattr(device, "type", device)
    if kind != "cpu":
        return "torch", (f"the ONNX image tower runs on CPUs: embedding on torch ({kind})" if asked == "onnx" else None)
    if precisions.BF16_BY_DEFAULT and asked == "auto" and precisions.cpu_has_bf16():
        return "torch", None
    if not onnxruntime_available():
        return "torch", "onnxruntime is not installed: images are embedded by torch (`pip install onnxruntime` is ~1.9x faster)"
    return "onnx", None


def index_encoder(spec: ModelSpec, device: str = "auto", min_cosine: float = precisions.MIN_COSINE,
                  *, images_for: Location | None = None, images: int | None = None):
    """The encoder of both towers: torch for text, images on `image_backend`'s choice, in the spec's
    precisions (`load_encoder`). Its `spec` says what runs; `precision_notice` why not what was asked.

    `images_for`: the index of a run that only embeds images, in this process; where
    `torch_free_encoder` can serve it, that encoder (no torch, no open_clip), else this one.
    `images`: how many images the run will embed, when known (`bulk_spec`).
    """
    spec = bulk_spec(spec, device, images)
    if images_for is not None:
        light = torch_free_encoder(spec, images_for, device, min_cosine)
        if light is not None:
            return light
    from loupe.indexer.models.encoder import load_encoder, resolve_device
    from loupe.indexer.models.spec import model_name_from_checkpoint

    backend, note = image_backend(spec, resolve_device(device))
    encoder = load_encoder(spec.replace(text_backend="torch", image_backend="torch"), device, min_cosine)
    if backend == "onnx":
        from loupe.indexer.models.image_tower import TowerUnavailable, load_tower

        try:
            encoder.use_onnx_images(load_tower(encoder, checkpoint_model=lambda: model_name_from_checkpoint(spec.checkpoint)))
        except TowerUnavailable as exc:
            note = f"the ONNX image tower cannot serve {spec.model} ({exc}): images are embedded by torch"
    encoder.precision_notice = note
    return encoder


def bulk_spec(spec: ModelSpec, device: str, images: int | None) -> ModelSpec:
    """`spec` as a run embedding `images` images runs it: with backend and precision both `auto`, on
    a CPU with bf16 units, from `precision.BF16_MIN_IMAGES` images on, torch with bf16 weights (the
    fastest faithful arithmetic there, checked on the first images like any faster precision);
    anything else unchanged."""
    if (
        images is not None
        and images >= precisions.BF16_MIN_IMAGES
        and spec.image_backend == "auto"
        and spec.image_precision == "auto"
        and cpu_only(device)
        and precisions.cpu_has_bf16()
    ):
        return spec.replace(image_backend="torch", image_precision="bf16")
    return spec


def torch_free_encoder(spec: ModelSpec, location: Location, device: str = "auto", min_cosine: float = precisions.MIN_COSINE):
    """The image encoder without torch (`loupe.indexer.models.onnx_images`) of a run indexing into
    `location`, or None (then the torch encoder runs, as before).

    It serves only where the torch encoder would embed with the ONNX tower in fp32 on a CPU (no GPU
    visible: `cpu_only`), the tower of these weights is cached with a transform it reproduces and
    was checked by this ONNX Runtime version, and the run has no text tower to export for the index
    (`text_tower.tower_state`: it has one, or the user cache can give it without torch, or towers
    are off).
    """
    from loupe.indexer.models.image_tower import onnxruntime_available
    from loupe.indexer.models.text_tower import cache_record, tower_enabled, tower_state

    if not cpu_only(device) or not onnxruntime_available() or image_backend(spec, "cpu")[0] != "onnx":
        return None
    weights_id = spec.weights_id
    if (
        tower_enabled()
        and tower_state(location, spec.model, weights_id) == "absent"
        and cache_record(spec.model, weights_id) is None
    ):
        return None
    from loupe.indexer.models.onnx_images import cached_image_encoder

    return cached_image_encoder(spec, min_cosine)


def cpu_only(device: str) -> bool:
    """Whether `device` resolves to the CPU (`encoder.resolve_device`), told without importing torch:
    'cpu', or 'auto' on a machine where no GPU torch could use is visible (no NVIDIA, ROCm or WSL GPU
    device, not macOS, whose MPS torch would pick)."""
    import glob
    import sys

    name = (device or "auto").lower()
    if name == "cpu":
        return True
    if name != "auto" or sys.platform == "darwin":
        return False
    return not any(glob.glob(pattern) for pattern in ("/dev/nvidia*", "/dev/kfd", "/dev/dxg"))


def onnx_may_serve(spec: ModelSpec, device: str) -> bool:
    """Whether the spec's text may run on the exported ONNX tower: a search on the CPU, in fp32
    ('auto' is fp32 there), with the tower not turned off (`LOUPE_TEXT_TOWER=0`)."""
    from loupe.indexer.models.text_tower import tower_enabled

    return (
        spec.text_backend in ("auto", "onnx")
        and spec.text_precision in ("auto", "fp32")
        and device in ("auto", "cpu")
        and tower_enabled()
    )


def query_encoder(
    location: Location,
    meta,
    spec: ModelSpec,
    device: str = "auto",
    *,
    one_off: bool = False,
    texts: Sequence[str] | None = None,
    meanwhile: Callable[[], None] = lambda: None,
):
    """The encoder of a search over the index `meta` describes, for `spec` (resolved against it).

    Text runs on the index's exported ONNX tower where it may (`onnx_may_serve`): fp32, the same
    vectors on every path. `one_off`: a single search (the CLI without a server): a session set up
    for one run, images through torch only if a query needs them; else (`loupe serve`) a session
    optimised for many runs (prepacked weights: 18-20 ms a short sentence against 26 ms for torch
    fp32 on ViT-B-32 here), with the torch encoder for images loading beside it. `texts`,
    the query's sentences when known, let a query answered from the query cache (or by images)
    never build the tower's session. `meanwhile` runs while the encoder loads (ONNX Runtime and
    torch both load mostly outside the GIL), e.g. reading the vector index.
    """
    if onnx_may_serve(spec, device) and (one_off or cpu_only(device)):  # a GPU serves text faster in torch
        encoder = _onnx_encoder(location, meta, spec, device, texts, one_off)
        if encoder is not None:
            meanwhile()
            return encoder
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loupe-preload") as pool:
        loading = pool.submit(meanwhile)
        # a query's image needs no exported tower (a one-off export would cost more than it saves)
        encoder = index_encoder(spec.replace(image_backend="torch") if spec.image_backend == "auto" else spec, device)
        loading.result()
    return encoder


def _onnx_encoder(location: Location, meta, spec: ModelSpec, device: str, texts: Sequence[str] | None, one_off: bool = True):
    """An `OnnxEncoder` over the cached tower of the index's model, or None (absent, or another model)."""
    from loupe.indexer.models.onnx_encoder import OnnxEncoder
    from loupe.indexer.models.query_cache import open_cache
    from loupe.indexer.models.text_tower import cached_tower, open_tower

    manifest = cached_tower(location, meta.model, meta.weights_id)
    if manifest is None or int(manifest.get("dim", -1)) != meta.dim:
        return None
    if texts is None:  # not known in advance: start loading at once
        background = True
    else:  # an image-only query, or one whose sentences are all cached, may never need the session
        background = any(v is None for v in open_cache(location, meta.weights_id, meta.dim).get(list(texts), "fp32", ahead=True))
    tower = open_tower(location, manifest, background=background, long_lived=not one_off)
    return OnnxEncoder(spec, tower, meta.dim, device, load_images=not one_off)  # `Searcher` checks its weights against the index's


def prestart(location: Location, texts: Sequence[str], text_precision: str = "auto", device: str = "auto") -> None:
    """Begin loading the index's cached text tower before the catalog is even opened (a cold search).

    ONNX Runtime builds its session outside the GIL, so the catalog's imports (SQLAlchemy, FAISS)
    run meanwhile. Only a guess, from the tower's manifest, until `query_encoder` checks it against
    the catalog; skipped when every sentence is in the query cache.
    """
    from loupe.indexer.models.query_cache import open_cache, uncached
    from loupe.indexer.models.text_tower import read_manifest, start_tower

    if not texts or not onnx_may_serve(ModelSpec(text_precision=text_precision), device):
        return
    data = read_manifest(location)
    if data is None or not data.get("usable"):
        return
    todo = uncached(texts, open_cache(location, data["weights_id"], int(data["dim"])).get(list(texts), "fp32", ahead=True))
    if todo:
        start_tower(location, data, ahead=todo)  # the sentences the search will ask the tower for


def cache_text_tower(encoder, location: Location, meta, on_error: Callable[[OSError], None] | None = None) -> str:
    """Export the text tower of a torch `encoder` of the index's model unless the index has one; the
    tower's state ('ready', 'unusable', 'absent').

    Only an fp32 CPU encoder exports (the tower must give fp32's vectors); an encoder without a
    text side (`onnx_images`) installs the tower from the user cache only. A folder that cannot be
    written leaves searches on torch (`on_error` hears why).
    """
    from loupe.indexer.models.text_tower import export_text_tower, tower_enabled, tower_state

    if meta is None:
        return "absent"
    state = tower_state(location, meta.model, meta.weights_id)
    if state != "absent" or not tower_enabled():
        return state
    text_side = hasattr(encoder, "encode_texts")
    if text_side and (
        encoder.spec.text_backend != "torch"
        or encoder.text_precision != "fp32"
        or getattr(encoder.device, "type", "cpu") != "cpu"
    ):
        return state
    try:
        manifest = export_text_tower(encoder, location, meta.weights_id, export=text_side)
        return "absent" if manifest is None else "ready" if manifest["usable"] else "unusable"
    except OSError as exc:
        if on_error is not None:
            on_error(exc)
        return "absent"
