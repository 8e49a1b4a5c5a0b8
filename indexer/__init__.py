"""loupe's offline side: walk sources, embed them, keep the catalog and the vector index."""

from loupe.indexer.errors import LoupeError

__all__ = ["LoupeError"]
