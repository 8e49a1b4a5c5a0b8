"""The torch encoder of a `ModelSpec`: model, eval transform and tokenizer, ready to embed batches.

`load_encoder(spec)` builds it through open_clip's own factory: a pretrained tag is fetched the
usual open_clip way (Hugging Face hub into its cache), a checkpoint file is loaded through the very
same code path. The spec's precisions are applied on load, so the encoder's `spec` says what it
runs. Vectors come out float32 and L2-normalised, so inner product is cosine. Which backend serves
a query's text (this, or the exported ONNX tower) is `loupe.indexer.models.factory`'s choice.
"""

from __future__ import annotations

import re
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.indexer.models import precision as precisions
from loupe.indexer.models.spec import ModelSpec, register_model_configs

BF16_MIN_COSINE = precisions.MIN_COSINE  # a bf16 text tower must agree this well with fp32 on a probe, else fp32 stays


@contextmanager
def gc_paused():
    """No automatic garbage collection while torch and open_clip are imported and a model is built;
    what they made is then moved out of the collector's sight (`gc.freeze`).

    They make ~10^6 objects that all live as long as the process, and every full collection scans
    them again: during the imports (2.4 s instead of 3.2 s for torch + open_clip after the CLI's own
    imports) and then during the run (an 800-photo bf16 `loupe index`: ~1.5 s of its 17 s). Reference
    counting still frees what they drop; only cycles among the frozen objects are never collected.
    Nested uses are no-ops (benchmarks/RESULTS.md, "Fixed cost").
    """
    import gc

    if not gc.isenabled():
        yield
        return
    gc.collect()  # garbage made before (a model dropped in a long-lived process) is not frozen with them
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def resolve_device(name: str = "auto") -> "torch.device":
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit device that is absent is an error."""
    with gc_paused():
        import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" or re.fullmatch(r"cuda:\d+", name):
        if not torch.cuda.is_available():
            raise LoupeError(f"--device {name}: no CUDA GPU is visible to torch (use --device cpu or auto)")
        count = torch.cuda.device_count()
        if name != "cuda" and int(name[5:]) >= count:
            raise LoupeError(f"--device {name}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
        return torch.device(name)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise LoupeError("--device mps: Apple MPS is not available here (use --device cpu or auto)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise LoupeError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")


@dataclass
class Encoder:
    """A loaded open_clip model with its eval transform and tokenizer, ready to embed batches."""

    spec: ModelSpec
    model: "torch.nn.Module"
    preprocess: "object"
    tokenizer: "object"
    device: "torch.device"
    dim: int
    image_size: int
    text_precision: str = "fp32"  # of query-time text encoding; see `set_text_precision`
    image_precision: str = "fp32"  # of image encoding ('fp16': CUDA autocast); see `set_image_precision`
    image_cosine: float = 1.0  # lowest cosine to fp32 its check measured
    image_bound: float = precisions.MIN_COSINE  # what that check required
    precision_notice: str | None = None  # set when a faster precision failed its check and fp32 took over
    fidelity_seconds: float = 0.0  # what that check cost
    _pending: tuple[str, float] | None = field(default=None, repr=False)
    _fp32_visual: "torch.nn.Module | None" = field(default=None, repr=False)  # kept while a lowered copy runs
    image_backend: str = "torch"  # what runs the image tower: 'torch', or 'onnx' (`use_onnx_images`)
    _onnx_images: "object | None" = field(default=None, repr=False)  # the ONNX tower once its check passed
    _onnx_candidate: "object | None" = field(default=None, repr=False)  # until then

    @property
    def weights_id(self) -> str:
        """Identifies the weights: the pretrained tag, or 'sha256:<hex>' of the checkpoint file."""
        return self.spec.weights_id

    def _autocast(self):
        import contextlib

        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def set_text_precision(self, precision: str = "auto") -> str:
        """Run the text tower in bf16 on a CPU that computes bf16 natively; returns what is used.

        A one-sentence query is bound by reading the text tower's weights, so halving them cuts
        its encoding time on CPUs with AMX or AVX512-BF16 (RESULTS.md), while the vector moves by
        a cosine of ~1e-4. An opt-in for query encoders (`--text-precision bf16`): 'auto' is fp32
        on a CPU, like the exported ONNX tower, so a search scores the same on every path and
        every CPU. A model whose bf16 text vector strays from fp32 on a probe sentence keeps
        fp32. On CUDA, text runs under fp16 autocast. The encoder's `spec` records the result.
        """
        chosen = self._set_text_precision(precision)
        self.spec = self.spec.replace(text_precision=chosen)
        return chosen

    def _set_text_precision(self, precision: str) -> str:
        import torch

        wanted = precisions.resolve_text(precision, self.device)
        if wanted != "bf16" or self.device.type != "cpu" or self.text_precision == "bf16":
            if self.text_precision != "bf16":  # bf16 weights stay: the fp32 ones are gone
                self.text_precision = wanted
            return self.text_precision
        probe = ["a photo of a dog on the beach"]
        reference = self.encode_texts(probe)
        params = [p for name, p in self.model.named_parameters() if name.split(".")[0] not in _NOT_TEXT]
        originals = [p.data for p in params]
        for p in params:
            p.data = p.data.to(torch.bfloat16)
        try:
            agree = float(np.dot(self.encode_texts(probe)[0], reference[0])) >= BF16_MIN_COSINE
        except RuntimeError:  # a text tower that cannot run in bf16
            agree = False
        if not agree:
            for p, data in zip(params, originals):
                p.data = data
            return self.text_precision
        self.text_precision = "bf16"
        return self.text_precision

    def set_image_precision(self, precision: str = "auto", min_cosine: float = precisions.MIN_COSINE) -> str:
        """Choose the arithmetic of image encoding (`loupe.indexer.models.precision`); returns the one chosen.

        A precision other than fp32 is checked once, on the first images embedded after this
        call: they are embedded in fp32 too, and unless every vector agrees within `min_cosine`,
        fp32 takes over for the rest of the run (`precision_notice` says so). Text encoding is
        `set_text_precision`'s business.
        """
        self._restore_fp32()
        chosen = precisions.resolve(precision, self.device, self.model.visual)
        self._pending = None if chosen == "fp32" else (chosen, min_cosine)
        self.image_bound, self.precision_notice, self.fidelity_seconds = min_cosine, None, 0.0
        self.spec = self.spec.replace(image_precision=chosen)
        return chosen

    def use_onnx_images(self, tower) -> None:
        """Embed images with an exported ONNX tower (`loupe.indexer.models.image_tower`), in fp32.

        Checked like a faster precision, on the first images embedded after this call, against
        torch fp32 within the tower's own bound (cosine 0.9999): if they stray, torch fp32 takes
        over for the rest of the run and `precision_notice` says so. Its vectors are recorded in the
        index as precision 'onnx-fp32' with the cosine measured, so the mixing rule applies to them.
        """
        from loupe.indexer.models.image_tower import MIN_COSINE

        self._restore_fp32()
        self._onnx_candidate = tower
        self._pending = ("onnx-fp32", MIN_COSINE)
        self.spec = self.spec.replace(image_backend="onnx", image_precision="fp32")

    def _restore_fp32(self) -> None:
        if self._fp32_visual is not None:
            self.model.visual = self._fp32_visual
            self._fp32_visual = None
        self._onnx_images = self._onnx_candidate = None
        self.image_backend = "torch"
        self.image_precision, self.image_cosine = "fp32", 1.0
        self.spec = self.spec.replace(image_precision="fp32", image_backend="torch")

    def _image_autocast(self):
        import contextlib

        import torch

        if self.device.type == "cuda" and self.image_precision in ("fp16", "bf16"):
            return torch.autocast("cuda", dtype=torch.float16 if self.image_precision == "fp16" else torch.bfloat16)
        return contextlib.nullcontext()

    def encode_images(self, pixels: "torch.Tensor") -> np.ndarray:
        """Embed a preprocessed batch (N, 3, H, W) into L2-normalised float32 rows."""
        if self._pending is not None:
            return self._encode_checked(pixels)
        return self._encode(pixels)

    def _encode_checked(self, pixels: "torch.Tensor") -> np.ndarray:
        """Switch to the pending precision if its vectors of the first images agree with fp32's."""
        import time

        chosen, bound = self._pending
        self._pending = None
        t = time.perf_counter()
        sample = min(precisions.FIDELITY_SAMPLE, len(pixels))
        reference = self._encode(pixels[:sample])
        fp32_visual = self.model.visual
        if chosen == "onnx-fp32":
            self._onnx_images, self._onnx_candidate, self.image_backend = self._onnx_candidate, None, "onnx"
        elif self.device.type == "cpu":
            self.model.visual = precisions.lowered(fp32_visual, chosen)
        self.image_precision = chosen
        self.fidelity_seconds = time.perf_counter() - t
        try:
            out = self._encode(pixels)
            cosine = float(np.min(np.sum(out[:sample] * reference, axis=1)))
            why = f"strayed from fp32 on the first images (cosine {cosine:.5f} < {bound})"
        except Exception as exc:  # a tower that cannot run in this precision (e.g. ModifiedResNet's pool in int8)
            cosine, why = float("nan"), f"cannot be computed ({type(exc).__name__}: {str(exc)[:80]})"
        if cosine >= bound:
            self.image_cosine = cosine
            self._fp32_visual = fp32_visual if self.model.visual is not fp32_visual else None
            return out
        self._fp32_visual = fp32_visual if self.model.visual is not fp32_visual else None
        self._restore_fp32()
        self.precision_notice = f"{chosen} image vectors of {self.spec.model} {why}: embedding in fp32"
        t = time.perf_counter()
        out = self._encode(pixels)
        self.fidelity_seconds += time.perf_counter() - t
        return out

    def _encode(self, pixels: "torch.Tensor") -> np.ndarray:
        if self._onnx_images is not None:
            return self._onnx_images.encode(pixels.numpy() if hasattr(pixels, "numpy") else pixels)
        import torch

        with torch.inference_mode(), self._image_autocast():
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()  # page-locked, so the copy below is truly asynchronous
            pixels = pixels.to(self.device, non_blocking=True)
            if self.image_precision == "bf16" and self.device.type == "cpu":
                pixels = pixels.to(torch.bfloat16)
            feats = self.model.encode_image(pixels)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embed sentences into L2-normalised float32 rows, in batches."""
        import torch

        out = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                feats = encode_text_trimmed(self.model, tokens)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


_NOT_TEXT = ("visual", "logit_scale", "logit_bias")  # top-level parameters outside the text tower


def prefix_encodable(model) -> bool:
    """Whether `model`'s text tower gives the same vector from its tokens cut after the last
    end-of-text (`encode_text_prefix`): CLIP's causal towers pooling at that token."""
    return (
        getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and getattr(model, "attn_mask", None) is not None
        and hasattr(model, "token_embedding")
        and getattr(model, "positional_embedding", None) is not None
    )


def encode_text_trimmed(model, tokens: "torch.Tensor") -> "torch.Tensor":
    """`model.encode_text(tokens)`, computed over the tokens up to the last end-of-text only.

    CLIP's text tower is causal and pools at the end-of-text token, so the padding after it
    (77 positions for a 6-word query) cannot change the result: dropping it gives the same
    vector up to float rounding, several times faster. Other text towers run unchanged.
    """
    if not prefix_encodable(model):
        return model.encode_text(tokens)
    if model.text_pool_type == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == model.text_eos_id).int().argmax(dim=-1)
    n = int(ends.max()) + 1
    if n >= tokens.shape[1]:
        return model.encode_text(tokens)
    return encode_text_prefix(model, tokens[:, :n])


def encode_text_prefix(model, tokens: "torch.Tensor") -> "torch.Tensor":
    """The text vectors of `tokens` (N, n), n up to the context length, each row holding its
    end-of-text (`prefix_encodable` models): the positions and causal mask cut to n. Traced into
    ONNX it keeps n dynamic (`loupe.indexer.models.text_tower`)."""
    import torch

    n = tokens.shape[1]
    if model.text_pool_type == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == model.text_eos_id).int().argmax(dim=-1)
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    # open_clip 2.24's Transformer (no `batch_first` attribute) takes (L, N, D); 2.32 and later (N, L, D)
    sequence_first = not hasattr(model.transformer, "batch_first")
    x = model.transformer(x.transpose(0, 1) if sequence_first else x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x.transpose(0, 1) if sequence_first else x)
    # the pooling open_clip's `text_global_pool` does for 'argmax' and 'eos', done here: its
    # signature changed across releases (2.24 returns a (pooled, tokens) pair; eos_token_id came in 3.1)
    x = x[torch.arange(x.shape[0], device=x.device), ends]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _embed_dim(model, name: str, tokenizer, device) -> int:
    """The width of the joint space: the model config's `embed_dim`, else measured on a probe sentence
    (a first forward pass costs seconds on a CPU: only when the config does not say)."""
    import open_clip
    import torch

    config = open_clip.get_model_config(name) or {}
    if isinstance(config.get("embed_dim"), int):
        return int(config["embed_dim"])
    with torch.inference_mode():
        return int(model.encode_text(tokenizer(["probe"]).to(device)).shape[-1])


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    if isinstance(size, (tuple, list)):
        size = max(size)
    return int(size)


_INIT_FUNCTIONS = ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_")
_BUILD_LOCK = threading.Lock()


@contextmanager
def _weights_from_file(checkpoint: str | None, full: bool):
    """While open_clip builds a model whose every weight a file then sets (`full`: it loads whole
    checkpoints with strict=True, so a missing weight is an error, never a random one): skip the
    random initialisation it would overwrite (`torch.nn.init`'s functions do nothing, as in Hugging
    Face's `no_init_weights`), and map a local zip checkpoint into memory instead of reading it
    through. Both are most of a run's start-up on a CPU (benchmarks/RESULTS.md, "Fixed cost")."""
    import torch.nn.init as init
    import torch.nn.modules.activation as activation

    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.5: no default mmap switch
        config = None
    with _BUILD_LOCK:
        if not full:
            yield
            return
        # torch.nn.init's functions, and the names modules imported from it (nn.MultiheadAttention's)
        modules = [init, activation]
        saved = [(m, name, getattr(m, name)) for m in modules for name in _INIT_FUNCTIONS if hasattr(m, name)]
        mmap_before = config.load.mmap if config is not None else None
        try:
            for module, name, _ in saved:
                setattr(module, name, lambda tensor, *args, **kwargs: tensor)
            if config is not None and checkpoint and zipfile.is_zipfile(checkpoint):
                config.load.mmap = True
            yield
        finally:
            for module, name, fn in saved:
                setattr(module, name, fn)
            if config is not None:
                config.load.mmap = mmap_before


def load_encoder(spec: ModelSpec | None = None, device: str = "auto", min_cosine: float = precisions.MIN_COSINE) -> Encoder:
    """Build the model, eval transform and tokenizer for `spec` on `device`, in the spec's precisions.

    The image precision (a choice other than fp32 is checked within `min_cosine` on the first
    images: `Encoder.set_image_precision`) and the text precision are resolved for the device
    here, so every process given the same spec (a Ray actor too) runs the same arithmetic; the
    encoder's `spec` records what was resolved, and its dimension. Every failure a user can cause (unknown model, weights not downloadable, bad checkpoint,
    absent device) becomes a one-line LoupeError that says what to pass instead.
    """
    with gc_paused():
        return _load_encoder(spec or ModelSpec(), device, min_cosine)


def _load_encoder(spec: ModelSpec, device: str, min_cosine: float) -> Encoder:
    import logging

    dev = resolve_device(device)
    import open_clip
    import torch

    register_model_configs()
    if spec.model not in open_clip.list_models():
        raise LoupeError(
            f"unknown model '{spec.model}': `loupe models` lists the names open_clip knows"
        )
    pretrained = spec.checkpoint or spec.pretrained
    if spec.pretrained and not spec.checkpoint:
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        if spec.pretrained not in tags:
            hint = ", ".join(tags[:6]) or "none: train one with `loupe train` or pass --checkpoint"
            raise LoupeError(
                f"'{spec.pretrained}' is not a pretrained tag of {spec.model} (known: {hint})"
            )
    logger = logging.getLogger()
    old_level = logger.level
    logger.setLevel(logging.CRITICAL)  # open_clip logs 'no pretrained weights' etc. at WARNING
    try:
        with _weights_from_file(spec.checkpoint if spec.checkpoint else None, full=bool(pretrained)):
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=pretrained, device=dev
            )
    except FileNotFoundError as exc:
        raise LoupeError(f"cannot read checkpoint {spec.checkpoint}: {exc}") from None
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if spec.checkpoint:
            raise LoupeError(
                f"checkpoint {spec.checkpoint} does not fit model {spec.model}: {msg[:300]}"
            ) from None
        raise LoupeError(
            f"could not load weights {spec.describe()} ({msg[:200]}); without internet, "
            "pass a local file with --checkpoint FILE (and --model NAME)"
        ) from None
    except Exception as exc:  # hub / network / unpickling errors surface with many types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoupeError(
            f"could not load weights {spec.describe()} ({type(exc).__name__}: {msg[:200]}); "
            "without internet, pass a local file with --checkpoint FILE (and --model NAME)"
        ) from None
    finally:
        logger.setLevel(old_level)
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.model)
    dim = _embed_dim(model, spec.model, tokenizer, dev)
    encoder = Encoder(
        spec=spec.replace(dim=dim, text_backend="torch"),
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=dev,
        dim=dim,
        image_size=_image_size(model),
    )
    encoder.set_image_precision(spec.image_precision, min_cosine)
    encoder.set_text_precision(spec.text_precision)
    return encoder
