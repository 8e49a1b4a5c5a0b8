"""`loupe train` mechanics in seconds: determinism, frozen towers, checkpoint format, errors."""

from __future__ import annotations

import json

import pytest
import torch

from loupe.indexer.models.encoder import load_encoder

from loupe.indexer.models.spec import make_spec
from loupe.indexer.errors import LoupeError
from loupe.retrieval.eval.training import TrainOptions, lr_at, train
from tests.conftest import FLICKR8K


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    entries = json.loads((FLICKR8K / "captions.json").read_text())[:12]
    path = tmp_path_factory.mktemp("pairs") / "captions.json"
    path.write_text(json.dumps(entries))
    return path


def options(tmp_path, pairs, name: str, **kw) -> TrainOptions:
    base = dict(images=FLICKR8K / "images", annotations=pairs, out=tmp_path / f"{name}.pt",
                batch_size=6, steps=4, device="cpu", seed=3)
    base.update(kw)
    return TrainOptions(**base)


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_same_seed_same_model_and_the_checkpoint_loads(tmp_path, pairs):
    lines: list[str] = []
    first = train(options(tmp_path, pairs, "a", model="loupe-tiny"), log=lines.append)
    second = train(options(tmp_path, pairs, "b", model="loupe-tiny"), log=lambda _: None)
    other = train(options(tmp_path, pairs, "c", model="loupe-tiny", seed=4), log=lambda _: None)
    a, b, c = weights(first.out), weights(second.out), weights(other.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert first.steps == 4 and first.epochs == 2.0 and len(first.history) == 2
    assert any(line.startswith("epoch 2 step 4/4 loss") for line in lines)

    saved = torch.load(first.out, map_location="cpu", weights_only=True)
    assert saved["model_name"] == "loupe-tiny" and saved["loupe"]["steps"] == 4 and saved["loupe"]["seed"] == 3
    encoder = load_encoder(make_spec(None, None, first.out), "cpu")  # the path `loupe eval/index` take
    loaded = encoder.model.state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)


def test_freeze_image_keeps_the_image_tower_and_its_batchnorm_stats(tmp_path, pairs, tiny_checkpoint):
    lines: list[str] = []
    result = train(
        options(tmp_path, pairs, "lit", checkpoint=tiny_checkpoint, freeze_image=True, lr=1e-3,
                val_images=FLICKR8K / "images", val_annotations=pairs),
        log=lines.append,
    )
    before, after = weights(tiny_checkpoint), weights(result.out)
    visual = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if not k.startswith(("visual.", "logit_"))]
    assert any("running_mean" in k for k in visual)
    assert all(torch.equal(before[k], after[k]) for k in visual)
    assert sum(not torch.equal(before[k], after[k]) for k in text) > len(text) // 2
    assert "image tower frozen" in "\n".join(lines)
    assert "val (exact) R@1/5/10 text->image" in lines[-2] and "val" in result.history[-1]

    free = train(options(tmp_path, pairs, "free", checkpoint=tiny_checkpoint, lr=1e-3), log=lambda _: None)
    assert not all(torch.equal(before[k], weights(free.out)[k]) for k in visual)


def test_freeze_text_keeps_the_text_tower(tmp_path, pairs, tiny_checkpoint):
    result = train(options(tmp_path, pairs, "t", checkpoint=tiny_checkpoint, freeze_text=True, lr=1e-3), log=lambda _: None)
    before, after = weights(tiny_checkpoint), weights(result.out)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(("visual.", "logit_")))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(freeze_image=True, freeze_text=True), "nothing to train"),
        (dict(val_images=FLICKR8K / "images"), "together"),
        (dict(model="no-such-model"), "unknown model"),
        (dict(images=FLICKR8K), "12 of 12 images .* missing"),
    ],
)
def test_user_errors(tmp_path, pairs, changes, message):
    with pytest.raises(LoupeError, match=message):
        train(options(tmp_path, pairs, "x", **{"model": "loupe-tiny", **changes}), log=lambda _: None)


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-6
