"""Interop: clip-retrieval's embedding shards, export and import."""
