"""Moved to `loupe.indexer.storage.synthetic` (shared by tests and benchmarks); kept so old imports still work."""

from loupe.indexer.storage.synthetic import ClipLike, bind_meta, insert_images, stats  # noqa: F401
