"""The `loupe` command: a thin typer layer over the indexer and retrieval libraries."""
