"""Model options resolve in one place: the index's model by default, contradictions are errors."""

from __future__ import annotations

import pytest

from loupe.indexer.models.spec import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec, resolve_spec
from loupe.indexer.errors import LoupeError

LAION = ModelSpec(DEFAULT_MODEL, DEFAULT_PRETRAINED, None)


@pytest.fixture(scope="module")
def tiny_bound(tiny_checkpoint) -> ModelSpec:
    """An index bound to the tiny checkpoint, as its catalog records it."""
    return resolve_spec(None, None, tiny_checkpoint)


def test_no_options_mean_the_index_model_else_the_default(tiny_bound, tiny_checkpoint):
    assert resolve_spec(None, None, None) == LAION
    assert resolve_spec(None, None, None, LAION) == LAION
    assert resolve_spec(None, None, None, tiny_bound) == tiny_bound == ModelSpec("loupe-tiny", None, str(tiny_checkpoint))
    assert resolve_spec("loupe-tiny", None, None, tiny_bound) == tiny_bound  # restating the index's model
    assert resolve_spec(DEFAULT_MODEL, None, None) == LAION
    assert resolve_spec(DEFAULT_MODEL, "openai", None) == ModelSpec(DEFAULT_MODEL, "openai", None)


def test_pretrained_without_model_is_an_error_unless_the_index_model_has_that_tag(tiny_bound):
    with pytest.raises(LoupeError, match="--pretrained openai needs --model"):
        resolve_spec(None, "openai", None)
    openai = ModelSpec(DEFAULT_MODEL, "openai", None)
    assert resolve_spec(None, "openai", None, openai) == openai  # the index's model has this tag
    with pytest.raises(LoupeError, match="this index was built with ViT-B-32/laion2b_s34b_b79k, not ViT-B-32/openai"):
        resolve_spec(None, "openai", None, LAION)  # a tag of the index's model, but other weights
    with pytest.raises(LoupeError, match="--pretrained openai needs --model"):
        resolve_spec(None, "openai", None, tiny_bound)  # not a tag of loupe-tiny


def test_contradictory_options_are_errors(tiny_checkpoint, tiny_bound, tmp_path):
    with pytest.raises(LoupeError, match="either --pretrained or --checkpoint"):
        resolve_spec(None, "openai", tiny_checkpoint)
    with pytest.raises(LoupeError, match="records model loupe-tiny, not ViT-B-32"):
        resolve_spec("ViT-B-32", None, tiny_checkpoint)
    with pytest.raises(LoupeError, match="not a pretrained tag of ViT-B-32"):
        resolve_spec("ViT-B-32", "no-such-tag", None)
    with pytest.raises(LoupeError, match="checkpoint file not found"):
        resolve_spec(None, None, tmp_path / "missing.pt")
    # options that name another model than the index's: the binding message, before any weights load
    for model, pretrained in (("ViT-B-32", None), ("ViT-B-32", "openai"), ("loupe-tiny", None)):
        bound = tiny_bound if model == "ViT-B-32" else LAION
        with pytest.raises(LoupeError, match="this index was built with"):
            resolve_spec(model, pretrained, None, bound)


def test_a_model_name_alone_is_not_weights(tiny_bound):
    with pytest.raises(LoupeError, match="--model ViT-L-14 names an architecture"):
        resolve_spec("ViT-L-14", None, None)
    assert resolve_spec("ViT-L-14", None, None, allow_random=True) == ModelSpec("ViT-L-14", None, None)  # loupe train


def test_foreign_checkpoint_takes_the_index_model(tmp_path, tiny_bound, tiny_checkpoint):
    import torch

    bare = tmp_path / "state_dict.pt"
    torch.save(torch.load(tiny_checkpoint, weights_only=True)["state_dict"], bare)  # records no model name
    with pytest.raises(LoupeError, match="does not record its model name"):
        resolve_spec(None, None, bare)
    assert resolve_spec(None, None, bare, tiny_bound) == ModelSpec("loupe-tiny", None, str(bare.resolve()))


def test_server_serves_the_resolved_model(tiny_checkpoint):
    from loupe.retrieval.web.client import ServerState, _serves_model

    state = ServerState(
        pid=1, port=9, catalog="sqlite:///x", model="loupe-tiny", pretrained=None, checkpoint=str(tiny_checkpoint),
        device="auto", started=0.0, text_precision="fp32",
    )
    assert _serves_model(state, None, None, None, "auto")
    assert _serves_model(state, "loupe-tiny", None, None, "auto")
    assert _serves_model(state, None, None, tiny_checkpoint, "auto")
    assert not _serves_model(state, "ViT-B-32", None, None, "auto")
    assert not _serves_model(state, None, "openai", None, "auto")


def test_cli_refuses_pretrained_without_model(loupe, tiny_checkpoint, photo_dir):
    proc = loupe("index", photo_dir, "--pretrained", "openai", ok=False)
    assert proc.returncode == 1 and proc.stderr.startswith("loupe: error: --pretrained openai needs --model"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)
    proc = loupe("search", "a dog", "--model", "ViT-B-32", ok=False)
    assert proc.returncode == 1 and "this index was built with loupe-tiny" in proc.stderr, proc.stderr
