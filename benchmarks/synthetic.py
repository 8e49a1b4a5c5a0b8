"""Moved to `indexer.synthetic` (shared by tests and benchmarks); kept so old imports still work."""

from indexer.synthetic import ClipLike, bind_meta, insert_images, stats  # noqa: F401
