"""loupe: search photos by sentence, by image, or against a caption corpus.

The installed package maps the repository's folders: `loupe.cli` (cli/, the command line),
`loupe.retrieval` (retrieval/, the query side) and `loupe.indexer` (indexer/, the offline side).
`python -m loupe` runs the command. docs/ARCHITECTURE.md is the map.
"""
