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
    """Console-script entry point: turns LoupeError and Ctrl-C into one-line messages.

    Every way out goes through `_exit`, which makes the shutdown deaf to SIGINT and SIGTERM: a
    finished command exits silently whatever signal arrives while the interpreter shuts down.
    """
    try:
        code, message = _run()
    except KeyboardInterrupt:
        code, message = 130, "loupe: interrupted"
    except BrokenPipeError:  # the reader of the output went away (`loupe search ... | head -1`)
        code, message = 1, None  # quietly, with click's exit code for it (the commands typer runs)
        _drop_stdout()
    _exit(code, message)


def _drop_stdout() -> None:
    """Point standard output at /dev/null, so that nothing left in its buffer fails again at exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _run() -> tuple[int, str | None]:
    """Run the command line; its exit code and the message to print last."""
    import signal

    try:
        signal.signal(signal.SIGINT, _interrupt_once)
    except ValueError:  # not the main thread
        pass
    if sys.argv[1:2] == ["search"]:  # the everyday command: without typer when its arguments are plain
        from loupe.cli.search_entry import run_fast

        code = run_fast(sys.argv[2:])
        if code is not None:
            return code, None
    import typer

    from loupe.indexer.errors import LoupeError

    from loupe.cli.app import app

    _register()
    sys.argv[1:] = _expand_ray_address(sys.argv[1:])
    try:
        code = app(standalone_mode=False, prog_name="loupe")  # returns typer.Exit codes here
        return (code if isinstance(code, int) else 0), None
    except LoupeError as exc:
        return 1, f"loupe: error: {exc}"
    except typer.Exit as exc:
        return exc.exit_code, None
    except typer.Abort:
        return 1, "loupe: aborted"
    except Exception as exc:  # click usage errors and the like (typer >= 0.29 raises its vendored click's)
        if isinstance(exc, _click_exceptions()):
            exc.show()
            return exc.exit_code, None
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
    """Print `message` and exit with `code`; from here on SIGINT and SIGTERM are let go unheard.

    People press Ctrl-C twice, and a service manager may send SIGTERM: once the work is done,
    neither may interrupt the way out (a KeyboardInterrupt in the interpreter's teardown prints
    'Exception ignored in ...' with a traceback). A Python no-op handler, not SIG_IGN: a signal
    already caught by the C handler but not yet run is then answered quietly too.
    """
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, _unheard)
        except ValueError:  # not the main thread
            pass
    if message:
        from loupe.cli.search_entry import echo

        echo(message, err=True)
    if sys.getprofile() is None and sys.gettrace() is None:  # a profiler writes its report after this returns
        _leave(code)
    sys.exit(code)


def _leave(code: int) -> None:
    """Exit as the interpreter would, without tearing every module down one by one.

    The threads still running are waited for (thread pools told to stop first) and the exit handlers
    run (Ray's shutdown, logging's flush), as at any exit; what is skipped is the freeing of every object before the process
    ends, which the OS does at once: ~1 s once torch and open_clip are loaded (a `loupe index` of
    the bf16 path), ~30 ms of a 0.28 s cold search. Nothing loupe writes waits for that teardown:
    catalogs are committed, and files are written, closed and renamed into place as they are made.
    """
    import atexit
    import os
    import threading

    # what the interpreter itself runs first at exit: the threading module's exit hooks (idle
    # thread-pool workers are told to stop), then every non-daemon thread joined; then atexit's
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, or a closed stream
            pass
    os._exit(code)


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C: interrupt the command; the next ones find it stopping already and are unheard.

    People press Ctrl-C twice: a second KeyboardInterrupt would land anywhere in the clean-up
    (in a garbage collector's callback it prints 'Exception ignored in ...' with a traceback).
    """
    import signal

    signal.signal(signal.SIGINT, _unheard)
    raise KeyboardInterrupt


def _unheard(signum, frame) -> None:
    """The handler of SIGINT and SIGTERM while a finished command exits: nothing to do."""


if __name__ == "__main__":  # `python -m loupe.cli.main`: run the importable module's app, not __main__'s
    from loupe.cli.main import run as _run

    _run()
