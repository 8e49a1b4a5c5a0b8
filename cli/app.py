"""The typer application the commands register on, and what every command shares.

`app` is made on first use (`from loupe.cli.app import app`): a plain `loupe search` never
builds it. Each commands_* module registers its commands on it; `loupe.cli.main` imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

_app = None


def __getattr__(name: str):
    """`app`, the typer application, made on first use (`from loupe.cli.app import app`)."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        import typer

        _app = typer.Typer(
            name="loupe",
            help="Search your photos by sentence, by image, or against captions (open_clip + FAISS).",
            no_args_is_help=True,
            add_completion=False,
            pretty_exceptions_enable=False,
        )
    return _app


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print a one-line error to stderr and return the Exit to raise."""
    import typer

    typer.echo(f"loupe: error: {message}", err=True)
    return typer.Exit(code)


def open_store(home, db, writer: bool = True):
    """The index; `writer=False` for commands that only read it (they never write vector files)."""
    from loupe.indexer.storage.store import Store

    return Store.open(home, db, writer=writer)


def writing(store, no_wait: bool = False):
    """Hold the index's writer lock for a writing command (a second writer waits, or fails with --no-wait)."""
    from loupe.indexer.storage.locking import writer_lock

    return writer_lock(store, wait=not no_wait)
