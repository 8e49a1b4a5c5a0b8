"""The `loupe` command line. Thin: each command parses options and calls one library function.

Heavy modules (torch, open_clip, faiss, sqlalchemy) are imported inside the commands, so
`loupe --help` is instant and a search only pays for what it uses. typer itself is imported
only when needed: a plain `loupe search ...` runs without it (`loupe.cli.search_entry`).
"""

from __future__ import annotations

import sys
def _register() -> None:
    from loupe.cli import commands_core  # noqa: F401  (registers index/search/info/check/remove)
    from loupe.cli import commands_dups  # noqa: F401  (registers duplicates)
    from loupe.cli import commands_serve  # noqa: F401  (registers serve)
    from loupe.cli import commands_shards  # noqa: F401  (registers export/import/build-index)

    from loupe.cli import commands_eval  # noqa: F401  (registers eval/train)


def run() -> None:
    """Console-script entry point: turns LoupeError and Ctrl-C into one-line messages."""
    if sys.argv[1:2] == ["search"]:  # the everyday command: without typer when its arguments are plain
        from loupe.cli.search_entry import run_fast

        try:
            code = run_fast(sys.argv[2:])
        except KeyboardInterrupt:
            _exit(130, "loupe: interrupted")
        if code is not None:
            _exit(code)
    import typer

    from loupe.indexer.errors import LoupeError

    from loupe.cli.app import app

    _register()
    sys.argv[1:] = _expand_ray_address(sys.argv[1:])
    try:
        code = app(standalone_mode=False, prog_name="loupe")  # returns typer.Exit codes here
        _exit(code if isinstance(code, int) else 0)  # the work is done: a late Ctrl-C no longer interrupts the way out
    except LoupeError as exc:
        typer.echo(f"loupe: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _exit(130, "loupe: interrupted")
    except typer.Exit as exc:
        _exit(exc.exit_code)
    except typer.Abort:
        typer.echo("loupe: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors and the like (typer >= 0.29 raises its vendored click's)
        if isinstance(exc, _click_exceptions()):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _click_exceptions() -> tuple[type, ...]:
    """ClickException of click and of the copy typer vendors (typer._click), whichever are installed."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(found)


def _expand_ray_address(args: list[str]) -> list[str]:
    """`--ray=ADDRESS` is `--ray --ray-address ADDRESS` (a bare `--ray` starts a local cluster)."""
    out: list[str] = []
    for a in args:
        if a.startswith("--ray=") and a != "--ray=":
            out += ["--ray", "--ray-address", a[len("--ray="):]]
        else:
            out.append(a)
    return out


def _exit(code: int, message: str | None = None) -> None:
    """Exit; one more Ctrl-C (people press it twice) no longer interrupts the way out with a traceback."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    if message:
        from loupe.cli.search_entry import echo

        echo(message, err=True)
    sys.exit(code)


if __name__ == "__main__":  # `python -m loupe.cli.main`: run the importable module's app, not __main__'s
    from loupe.cli.main import run as _run

    _run()
