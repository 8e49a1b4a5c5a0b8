"""`loupe eval`: embed a captioned image set, score exact recall@k both ways, report honestly.

Exact scores are the standard (CLIP_benchmark) ones. Two extra views appear when they apply:
"same caption" when identical caption strings describe several images (templated data, where
exact-image recall calls a correct match wrong), and "ANN" when an approximate FAISS index is
asked for, so users see what the approximation costs next to the exact figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from loupe.indexer.errors import LoupeError
from loupe.retrieval.eval.annotations import Annotations, load_annotations, resolve_image_paths
from loupe.retrieval.eval.metrics import DEFAULT_KS, chance_recall, ranks_from_embeddings

PUBLISHED_FILE = Path(__file__).with_name("published_flickr30k.json")
DIRECTIONS = ("text_to_image", "image_to_text")
_SHOW_NAMES = 5
ALLOW_MISSING_HINT = "; pass --allow-missing to evaluate the images that are there"


@dataclass
class BoundSet:
    """Annotations whose images were all found on disk (missing ones dropped when allowed)."""

    annotations: Annotations
    paths: list[Path]
    missing: list[str]
    listed: int  # images in the annotations file before dropping


def _name_list(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOW_NAMES])
    return shown + (f", ... ({len(names) - _SHOW_NAMES} more)" if len(names) > _SHOW_NAMES else "")


def bind_images(ann: Annotations, images_dir: str | os.PathLike, allow_missing: bool, hint: str = "") -> BoundSet:
    """Find every annotated image under `images_dir`; missing ones are an error unless allowed."""
    if not Path(images_dir).is_dir():
        raise LoupeError(f"images folder not found: {images_dir}")
    found = resolve_image_paths(images_dir, ann.images)
    missing = [name for name, p in zip(ann.images, found) if p is None]
    if missing and (not allow_missing or len(missing) == len(found)):
        raise LoupeError(
            f"{len(missing)} of {len(found)} images listed in {ann.source} are missing from {images_dir}: "
            f"{_name_list(missing)}{hint if len(missing) < len(found) else ''}"
        )
    keep = [i for i, p in enumerate(found) if p is not None]
    return BoundSet(ann.subset(keep) if missing else ann, [found[i] for i in keep], missing, len(found))


def caption_key(text: str) -> str:
    """Captions that tokenize alike are the same caption (open_clip lower-cases, collapses spaces)."""
    return " ".join(text.lower().split())


def same_caption_groups(captions: Sequence[str], caption_image: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """(first caption index of each distinct caption, the images each distinct caption describes)."""
    first: dict[str, int] = {}
    images: dict[str, set[int]] = {}
    for c, (text, img) in enumerate(zip(captions, caption_image)):
        key = caption_key(text)
        first.setdefault(key, c)
        images.setdefault(key, set()).add(int(img))
    return list(first.values()), [sorted(images[k]) for k in first]


def _chance(n_images: int, images_per_text, n_texts: int, texts_per_image: np.ndarray, ks) -> dict:
    """Expected recall of a random ranking, both ways (images without texts are not queries)."""
    return {
        "text_to_image": {f"R@{k}": chance_recall(n_images, images_per_text, k) for k in ks},
        "image_to_text": {f"R@{k}": chance_recall(n_texts, texts_per_image[texts_per_image > 0], k) for k in ks},
    }


def score_embeddings(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: Sequence[int],
    captions: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, dict]:
    """Exact recall@k and ranks, with chance levels; plus the same-caption view if it applies."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_images = len(image_emb)
    per_image = np.bincount(caption_image, minlength=n_images)
    exact = ranks_from_embeddings(text_emb, image_emb, caption_image).summary(ks)
    exact["chance"] = _chance(n_images, [1], len(text_emb), per_image, ks)
    scores = {"exact": exact}
    firsts, groups = same_caption_groups(captions, caption_image)
    shared = sum(len(g) > 1 for g in groups)
    if shared:
        same = ranks_from_embeddings(text_emb[firsts], image_emb, groups).summary(ks)
        per_image_unique = np.zeros(n_images, np.int64)
        for g in groups:
            per_image_unique[g] += 1
        same["chance"] = _chance(n_images, [len(g) for g in groups], len(groups), per_image_unique, ks)
        same["distinct_captions"] = len(groups)
        same["captions_on_several_images"] = shared
        scores["same_caption"] = same
    return scores


def ann_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: Sequence[int],
    factory: str,
    ks: Sequence[int] = DEFAULT_KS,
    search_params: str | None = None,
) -> dict[str, object]:
    """Recall@k as `loupe search`'s own index class returns results for this FAISS factory
    (searched with loupe's defaults, or `search_params` over them, as `loupe search --search-params`)."""
    from loupe.indexer.storage.vectors import VectorIndex

    caption_image = np.asarray(caption_image, dtype=np.int64)
    kmax = max(ks)
    out: dict[str, object] = {"factory": factory}
    started = time.perf_counter()
    for direction, items, queries in (("text_to_image", image_emb, text_emb), ("image_to_text", text_emb, image_emb)):
        index = VectorIndex.create(items.shape[1], factory)
        try:
            index.train(items)
            index.add(np.arange(len(items), dtype=np.int64), items)
        except RuntimeError as exc:
            raise LoupeError(
                f"FAISS index {factory!r} cannot be built over {len(items)} vectors: {str(exc).splitlines()[0]}"
            ) from None
        index.configure(search_params)
        out["search_params"] = dict(index.search_params)
        _, ids = index.search(queries, kmax)
        found = ids >= 0
        if direction == "text_to_image":
            hit = found & (ids == caption_image[:, None])
        else:  # a returned caption is right when it belongs to the query image
            hit = found & (caption_image[np.where(found, ids, 0)] == np.arange(len(queries))[:, None])
            hit = hit[np.bincount(caption_image, minlength=len(queries)) > 0]
        out[direction] = {f"R@{k}": float(100.0 * hit[:, :k].any(axis=1).mean()) for k in ks}
    out["seconds"] = time.perf_counter() - started
    return out


def image_set_fingerprint(names: Sequence[str]) -> str:
    """Identifies a benchmark split by its image base names, independent of order and folder."""
    return hashlib.sha256("\n".join(sorted(os.path.basename(n) for n in names)).encode()).hexdigest()


def published_row(model: str, pretrained: str | None, image_names: Sequence[str]) -> dict | None:
    """open_clip's published Flickr30k figures for this model/tag on this very split, in percent."""
    if not pretrained:
        return None
    table = json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))
    if image_set_fingerprint(image_names) != table["images_sha256"]:
        return None
    for row in table["rows"]:
        if row["model"] == model and row["pretrained"] == pretrained:
            return {
                "source": table["url"],
                "dataset": table["dataset"],
                **{d: {k: round(100.0 * v, 2) for k, v in row[d].items()} for d in DIRECTIONS},
            }
    return None


@dataclass
class EvalReport:
    """Everything `loupe eval` prints and writes as JSON."""

    model: dict
    data: dict
    counts: dict
    timings: dict
    scores: dict
    published: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return format_report(self)


def evaluate(
    images_dir: str | os.PathLike,
    annotations: Annotations | str | os.PathLike,
    encoder: "Encoder",
    batch_size: int = 64,
    allow_missing: bool = False,
    index_factory: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    search_params: str | None = None,
) -> EvalReport:
    """Embed every annotated image and caption with `encoder` and score retrieval both ways.

    Missing (or unreadable) images are a LoupeError naming them, unless `allow_missing`, which
    scores the present subset and puts a warning in the report saying it is a subset.
    """
    from loupe.indexer.pipeline.batching import embed_images

    ann = annotations if isinstance(annotations, Annotations) else load_annotations(annotations)
    bound = bind_images(ann, images_dir, allow_missing, ALLOW_MISSING_HINT)
    started = time.perf_counter()
    # the reference pixels (PIL -> RGB -> open_clip's preprocess, EXIF ignored): CLIP_benchmark's figures
    emb = embed_images([str(p) for p in bound.paths], encoder, batch_size, workers, progress, "images", reference=True)
    t_images = time.perf_counter() - started
    unreadable = {bound.annotations.images[i]: reason for i, reason in emb.bad.items()}
    if unreadable and not allow_missing:
        names = [f"{n} ({r})" for n, r in unreadable.items()]
        raise LoupeError(f"{len(names)} images could not be read: {_name_list(names)}{ALLOW_MISSING_HINT}")
    data_set = bound.annotations.subset(emb.ok) if unreadable else bound.annotations
    if not data_set.images:
        raise LoupeError("no image could be read: nothing to evaluate")

    started = time.perf_counter()
    text_emb = encoder.encode_texts(data_set.captions, batch_size=max(batch_size, 256))
    t_texts = time.perf_counter() - started
    started = time.perf_counter()
    scores = score_embeddings(emb.vectors, text_emb, data_set.caption_image, data_set.captions, ks)
    t_scoring = time.perf_counter() - started
    if index_factory:
        scores["ann"] = ann_recall(emb.vectors, text_emb, data_set.caption_image, index_factory, ks, search_params)

    warnings: list[str] = []
    absent = len(bound.missing) + len(unreadable)
    if absent:
        warnings.append(
            f"SUBSET ONLY: {absent} of {bound.listed} images are missing or unreadable "
            f"({_name_list(bound.missing + list(unreadable))}); these figures cover the "
            f"{len(data_set.images)} present images and are not comparable with full-set results"
        )
    from loupe.indexer.pipeline.imageio import exif_rotated

    rotated = [name for name, path in zip(bound.annotations.images, bound.paths) if exif_rotated(path)]
    if rotated:
        warnings.append(
            f"{len(rotated)} images carry an EXIF orientation ({_name_list(rotated)}): eval reads them unrotated, "
            "as CLIP_benchmark and published figures do, while `loupe index` shows them upright"
        )
    spec = encoder.spec
    published = published_row(spec.model, None if spec.checkpoint else spec.pretrained, ann.images)
    if published and absent:
        warnings.append("the published figures below are for the full split: differences mean little on a subset")
    return EvalReport(
        model={
            "name": spec.model,
            "pretrained": spec.pretrained,
            "checkpoint": spec.checkpoint,
            "weights": encoder.weights_id,
            "description": spec.describe(),
            "dim": encoder.dim,
            "device": str(encoder.device),
            "image_precision": encoder.image_precision,
            "image_cosine": round(encoder.image_cosine, 6),  # lowest cosine to fp32 its first-batch check measured
        },
        data={
            "images_dir": str(Path(images_dir).resolve()),
            "annotations": ann.source,
            "format": ann.format,
            "pixels": "reference: PIL open -> RGB -> the model's open_clip preprocess (EXIF orientation ignored)",
            "exif_rotated": len(rotated),
        },
        counts={
            "images_listed": bound.listed,
            "images": len(data_set.images),
            "captions": len(data_set.captions),
            "missing": len(bound.missing),
            "unreadable": len(unreadable),
            "subset": bool(absent),
        },
        timings={
            "embed_images_s": round(t_images, 3),
            "images_per_s": round(len(data_set.images) / t_images, 1) if t_images > 0 else None,
            "embed_texts_s": round(t_texts, 3),
            "scoring_s": round(t_scoring, 3),
        },
        scores=scores,
        published=published,
        warnings=warnings,
    )


def _row(label: str, values: dict, ks: Sequence[int], ranks: bool = True) -> str:
    cells = "".join(f"{values[f'R@{k}']:>8.2f}" for k in ks)
    if ranks and "median_rank" in values:
        cells += f"{values['median_rank']:>9.1f}{values['mean_rank']:>9.1f}"
    return f"  {label:<22}{cells}"


def format_report(r: EvalReport) -> str:
    """The human-readable table: exact scores with chance, then the extra views and timings."""
    ks = [int(key[2:]) for key in r.scores["exact"]["text_to_image"] if key.startswith("R@")]
    banner = [f"!!! WARNING: {w}" for w in r.warnings]
    lines = [*banner]
    c = r.counts
    lines.append(f"model    {r.model['description']} on {r.model['device']}")
    lines.append(f"data     {c['images']} images, {c['captions']} captions ({r.data['format']} file {r.data['annotations']})")
    lines.append(f"         images from {r.data['images_dir']}")
    header = f"  {'':<22}" + "".join(f"{'R@' + str(k):>8}" for k in ks)
    lines.append("")
    lines.append(header + f"{'median':>9}{'mean':>9}   (recall in %, ranks 1-based, ties count against)")

    def view(title: str, s: dict) -> None:
        lines.append(title)
        for d, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
            lines.append(_row(label, s[d], ks))
            lines.append(_row("  chance", s["chance"][d], ks, ranks=False))

    view("exact (each caption's own image; the standard benchmark figure)", r.scores["exact"])
    same = r.scores.get("same_caption")
    if same and same["captions_on_several_images"] < 0.01 * same["distinct_captions"]:
        lines.append(f"  ({same['captions_on_several_images']} caption(s) describe several images: same-caption view in the JSON)")
    elif same:
        lines.append(
            "  note: identical captions embed identically, so in the exact view a caption of another image "
            "ties with the right one and counts as ahead"
        )
        view(
            f"same caption ({same['captions_on_several_images']} captions describe several images: any of "
            f"them counts; image -> text against {same['distinct_captions']} distinct captions)",
            same,
        )
    ann = r.scores.get("ann")
    if ann:
        params = ",".join(f"{k}={v}" for k, v in ann.get("search_params", {}).items())
        shown = f"{ann['factory']} [{params}]" if params else ann["factory"]
        lines.append(f"ANN index {shown} (what an approximate search index returns; {ann['seconds']:.2f}s)")
        for d, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
            lines.append(_row(label, ann[d], ks))
            diff = {key: ann[d][key] - r.scores["exact"][d][key] for key in ann[d]}
            lines.append("  " + f"{'  vs exact':<22}" + "".join(f"{diff[f'R@{k}']:>+8.2f}" for k in ks))
    if r.published:
        lines.append(f"published ({r.published['source']})")
        for d, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
            pub = r.published[d]
            shown = [k for k in ks if f"R@{k}" in pub]
            lines.append(f"  {label:<22}" + "".join(f"{pub[f'R@{k}']:>8.2f}" for k in shown))
            lines.append(
                f"  {'  measured - published':<22}"
                + "".join(f"{r.scores['exact'][d][f'R@{k}'] - pub[f'R@{k}']:>+8.2f}" for k in shown)
            )
    t = r.timings
    rate = f" ({t['images_per_s']} img/s)" if t["images_per_s"] else ""
    lines.append("")
    lines.append(
        f"time     images {t['embed_images_s']:.2f}s{rate}, captions {t['embed_texts_s']:.2f}s, scoring {t['scoring_s']:.2f}s"
    )
    lines.extend(banner)
    return "\n".join(lines)
