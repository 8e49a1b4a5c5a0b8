"""The signals every `loupe index` runs: one line per signal ("module:Class")."""

from __future__ import annotations

import functools
import importlib

from loupe.indexer.signals.base import Signal

REGISTERED = (
    "loupe.indexer.signals.phash:PerceptualHash",
    "loupe.indexer.signals.neardup:NearDuplicate",
    "loupe.indexer.signals.ocr:RecognisedText",
)


@functools.cache
def registered() -> tuple[Signal, ...]:
    """An instance of each registered signal, in registration order."""
    out = []
    for entry in REGISTERED:
        module, _, cls = entry.partition(":")
        out.append(getattr(importlib.import_module(module), cls)())
    return tuple(out)


def by_name(name: str) -> Signal:
    """The registered signal called `name`."""
    for sig in registered():
        if sig.name == name:
            return sig
    raise KeyError(name)
