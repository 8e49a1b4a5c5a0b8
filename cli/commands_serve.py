"""serve: keep the model and indices loaded; serve the web page, its API and `loupe search`."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from loupe.cli.app import app
from loupe.cli.options import AnnOptions, LocationOptions, ModelOptions, TextPrecisionOpt, grouped


@app.command()
@grouped
def serve(
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free port).")] = 0,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback requires the printed token on every request.")] = "127.0.0.1",
    allow_host: Annotated[Optional[List[str]], typer.Option("--allow-host", help="Another Host name this server answers to (a DNS name behind which it runs); repeatable.")] = None,
    no_token: Annotated[bool, typer.Option("--no-token", help="Single-user machines only: serve the page and API on loopback without the access token (any local user and any local service can then read the photos).")] = False,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest query image upload, in MiB.")] = 32,
    model: ModelOptions = ModelOptions(),
    text_precision: TextPrecisionOpt = "auto",
    approx: AnnOptions = AnnOptions(),
    at: LocationOptions = LocationOptions(),
) -> None:
    """Serve the web page and searches from a long-lived process; `loupe search` uses it while it runs.

    Open the printed URL in a browser. The model and indices stay loaded, so a query costs
    milliseconds instead of a model load. Changes made by `loupe index` meanwhile are picked up
    before the next query. Stop with Ctrl-C or SIGTERM. API: GET /api/openapi.json; the CLI's
    GET /health and POST /search (retrieval/web/server.py).
    """
    from loupe.retrieval.engine.search import open_searcher
    from loupe.retrieval.web.server import serve as run_server

    searcher = open_searcher(
        at.home, at.db, model.model, model.pretrained, model.checkpoint, model.device, text_precision=text_precision,
        long_lived=True, search_params=approx.joined(),
    )

    from loupe.indexer.storage.locations import redact_url
    from loupe.retrieval.web.guard import canonical_host

    def ready(state) -> None:
        typer.echo(f"loupe: serving {redact_url(searcher.store.describe())} with {searcher.encoder.spec.describe()} on {state.url} (query text in {state.text_precision})", err=True)
        shown = state.url if canonical_host(host) == state.connect_host else f"http://{host}:{state.port}"
        # the token in the fragment: never sent to a server, never in a cookie (see retrieval/web/guard.py)
        typer.echo(f"loupe: open {shown}/" if no_token else f"loupe: open {shown}/#token={state.token}", err=True)

    run_server(
        searcher, port=port, device=model.device, on_ready=ready, host=host, allowed_hosts=tuple(allow_host or ()),
        upload_limit=int(max_upload_mb * (1 << 20)), no_token=no_token,
    )
    typer.echo("loupe: server stopped", err=True)
