"""serve: keep the model and indices loaded and answer `loupe search` over local HTTP."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.main import app
from cli.options import (
    CheckpointOpt, DbOpt, DeviceOpt, EfSearchOpt, HomeOpt, ModelOpt, NprobeOpt, PretrainedOpt, SearchParamsOpt,
    TextPrecisionOpt,
)


@app.command()
def serve(
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port on 127.0.0.1 (0: any free port).")] = 0,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    text_precision: TextPrecisionOpt = "auto",
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    search_params: SearchParamsOpt = None,
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """Serve searches from a long-lived process (127.0.0.1 only); `loupe search` uses it while it runs.

    The model and indices stay loaded, so a query costs milliseconds instead of a model load.
    Changes made by `loupe index` meanwhile are picked up before the next query. Stop with
    Ctrl-C or SIGTERM. API: GET /health, POST /search (JSON; see retrieval/server.py).
    """
    from indexer.vectors import join_search_params
    from retrieval.search import open_searcher
    from retrieval.server import serve as run_server

    searcher = open_searcher(
        home, db, model, pretrained, checkpoint, device, text_precision=text_precision, long_lived=True,
        search_params=join_search_params(search_params, nprobe, ef_search),
    )

    def ready(state) -> None:
        typer.echo(f"loupe: serving {searcher.store.describe()} with {searcher.encoder.spec.describe()} on {state.url} (query text in {state.text_precision})", err=True)

    run_server(searcher, port=port, device=device, on_ready=ready)
    typer.echo("loupe: server stopped", err=True)
