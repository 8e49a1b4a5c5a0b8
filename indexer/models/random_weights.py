"""Seeded random-weight checkpoints of real open_clip architectures, in loupe's checkpoint format.

No weights can be downloaded on the machines loupe is built on, so the test suite (a tiny model)
and the speed benchmarks (full-size architectures, whose speed does not depend on the weights'
values) both build models this way. It lives in the package so that neither side needs the
other's extras: benchmarks run without pytest, tests without the benchmark scripts.
"""

from __future__ import annotations

from pathlib import Path


def save_random_model(path: Path, model_name: str = "loupe-tiny", seed: int = 0) -> Path:
    """Build `model_name` with seeded random weights and save it where `--checkpoint` can load it."""
    import open_clip
    import torch

    from loupe.indexer.models.spec import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    torch.save({"model_name": model_name, "state_dict": model.state_dict()}, path)
    return path
