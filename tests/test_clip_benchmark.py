"""`loupe eval` gives CLIP_benchmark's numbers: same photos, captions and weights (a model trained
here by `loupe train`), CLIP_benchmark's own `zeroshot_retrieval.evaluate` on its own pipeline
(PIL open -> RGB -> open_clip's preprocess, open_clip's model and tokenizer loaded directly).

`clip-benchmark` is installed with --no-deps by .ci/run (its retrieval metric needs only torch
and tqdm); the test is skipped only where that import fails.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.conftest import FLICKR8K

zeroshot_retrieval = pytest.importorskip(
    "clip_benchmark.metrics.zeroshot_retrieval",
    reason="clip-benchmark is not installed (.ci/run: pip install --no-deps clip-benchmark==1.6.2)",
)

TOLERANCE = 0.25  # points: float rounding in other batch shapes may flip a near-tie, nothing more
KS = (1, 5, 10)


class CaptionedImages(torch.utils.data.Dataset):
    """What CLIP_benchmark's retrieval datasets yield: (transformed image, list of its captions)."""

    def __init__(self, entries: list[dict], transform) -> None:
        self.entries, self.transform = entries, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        entry = self.entries[i]
        return self.transform(Image.open(FLICKR8K / "images" / entry["image"]).convert("RGB")), entry["captions"]


def collate(batch):
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def clip_benchmark_recall(checkpoint, entries: list[dict]) -> dict[str, dict[str, float]]:
    """CLIP_benchmark's figures in loupe's layout (percent; image_retrieval is text -> image)."""
    import open_clip

    from loupe.indexer.models.spec import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)  # loupe-tiny's config; weights straight from the file
    model, _, preprocess = open_clip.create_model_and_transforms("loupe-tiny", pretrained=str(checkpoint))
    model.eval()
    loader = torch.utils.data.DataLoader(CaptionedImages(entries, preprocess), batch_size=64, collate_fn=collate)
    metrics = zeroshot_retrieval.evaluate(
        model, loader, open_clip.get_tokenizer("loupe-tiny"), "cpu", amp=False, recall_k_list=list(KS)
    )
    return {
        "text_to_image": {f"R@{k}": 100 * metrics[f"image_retrieval_recall@{k}"] for k in KS},
        "image_to_text": {f"R@{k}": 100 * metrics[f"text_retrieval_recall@{k}"] for k in KS},
    }


def test_loupe_eval_matches_clip_benchmark(flickr_trained, loupe, tmp_path):
    entries = json.loads((FLICKR8K / "captions.json").read_text())
    out = tmp_path / "eval.json"
    loupe("eval", "--checkpoint", flickr_trained, "--images", FLICKR8K / "images",
          "--annotations", FLICKR8K / "captions.json", "--json", out)
    report = json.loads(out.read_text())
    assert (report["counts"]["images"], report["counts"]["captions"]) == (800, 4000)
    ours = report["scores"]["exact"]
    theirs = clip_benchmark_recall(flickr_trained, entries)

    # a model that learnt something, so that agreeing is not agreeing on noise
    chance = ours["chance"]
    assert ours["text_to_image"]["R@10"] >= 10 * chance["text_to_image"]["R@10"]
    assert ours["image_to_text"]["R@10"] >= 10 * chance["image_to_text"]["R@10"]
    for direction in ("text_to_image", "image_to_text"):
        for k in KS:
            key = f"R@{k}"
            assert ours[direction][key] == pytest.approx(theirs[direction][key], abs=TOLERANCE), (direction, key, ours, theirs)
