"""The loaded search service of `loupe serve`: one `Searcher` answering one query at a time.

The HTTP server runs on the thread that loaded the model, one request after another: torch gives
every thread that runs ops its own OpenMP team, and a second thread's team made queries slower
(benchmarks/RESULTS.md). Queries are serial either way. Before each query the service checks the
catalog generation, so a concurrent `loupe index` is picked up without a restart.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from typing import Iterator

from loupe.indexer.storage.catalog_names import IMAGE, TEXT
from loupe.indexer.storage.locations import redact_url
from loupe.retrieval.engine.pages import Pages
from loupe.retrieval.engine.requests import RequestError, SearchRequest

QUERY_THREADS = 1  # torch threads that encode a query's sentences in the server (see `query_threads`)


class SearchService:
    """A Searcher (and the page's `Pages` over it) that answers on the thread that loaded the model."""

    def __init__(self, searcher) -> None:
        self.searcher = searcher
        self.pages = Pages(searcher)
        self.queries = 0

    def refresh(self) -> None:
        """Catch up with changes made by `loupe index` since the last query (one query when none)."""
        store = self.searcher.store
        if store.catalog.generation() == self.searcher.meta.generation:
            return
        meta = store.require_meta()
        if (meta.weights_id, meta.dim) != (self.searcher.meta.weights_id, self.searcher.meta.dim):
            raise RuntimeError("the index was rebuilt with another model: restart `loupe serve`")
        self.searcher.meta = meta
        store.refresh()

    def health(self) -> dict:
        self.refresh()
        store = self.searcher.store
        return {
            "status": "ok",
            "pid": os.getpid(),
            "catalog": redact_url(store.location.url),
            "model": self.searcher.encoder.spec.describe(),
            "text_precision": self.searcher.encoder.text_precision,
            "generation": self.searcher.meta.generation,
            "queries": self.queries,
            "vectors": {kind: index.ntotal for kind, index in store.loaded_indices().items()},
        }

    def search(self, query: SearchRequest) -> dict:
        """Answer the CLI's query: {"hits": [{"rank", "score", "kind", "vector_id", "fields", "json"}]}."""
        for term in query.terms:
            if term.kind == "image":
                _regular_file(term.value)
        self.refresh()
        with query_threads():
            hits = self.searcher.search(list(query.terms), target=query.target, k=query.limit, filters=query.filters,
                                        min_score=query.min_score)
        self.queries += 1
        return {
            "hits": [
                {"rank": h.rank, "score": h.score, "kind": h.kind, "vector_id": h.vector_id, "fields": h.fields, "json": h.to_json()}
                for h in hits
            ]
        }

    def page_search(self, query: SearchRequest) -> dict:
        """One page of the page's results (`Pages.search`)."""
        self.refresh()
        with query_threads():
            return self.pages.search(query)

    def warm_up(self) -> None:
        """Load what the first query would (indices, first text encoding, the page's snapshot)."""
        store = self.searcher.store
        for kind in (IMAGE, TEXT):
            if store.catalog.count_vectors(kind):
                store.vector_index(kind)
        with query_threads():
            self.searcher.encoder.encode_texts(["a photo"])
        self.pages.snapshot()


@contextlib.contextmanager
def query_threads(threads: int = QUERY_THREADS) -> Iterator[None]:
    """Run torch on `threads` threads meanwhile (a query's sentences; images keep every core).

    One short sentence through the text tower reads all its weights for a dozen tokens: a second
    thread was no faster on an idle machine and much slower while anything else wanted a core
    (benchmarks/RESULTS.md). Switching costs microseconds.
    """
    torch = sys.modules.get("torch")
    if torch is None:  # no torch model in this process: nothing to tune
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _regular_file(path: str) -> None:
    """Refuse a query image that is not a regular file: reading /dev/zero or a FIFO would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise RequestError(400, f"cannot read query image {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise RequestError(400, f"cannot read query image {path}: not a regular file")
