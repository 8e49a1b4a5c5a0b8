"""Critical sections: a commit and the bookkeeping that goes with it are never cut in half.

A Ctrl-C (or SIGTERM) that arrives while a catalog commit or a vector-file save runs is held
back and delivered as soon as the section ends, so a signal lands either before the commit
(nothing written) or after it (everything written and recorded), never in between. People
press Ctrl-C twice: the second one waits for the same point. SIGKILL cannot be deferred; the
catalog's transactions and the atomic file renames cover that case.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

DEFERRED = (signal.SIGINT, signal.SIGTERM)
_state = threading.local()


@contextmanager
def critical_section() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM until the block ends, then deliver them (once each).

    Nests; a no-op off the main thread (Python runs signal handlers only there, and only the
    main thread may install them).
    """
    if threading.current_thread() is not threading.main_thread() or getattr(_state, "depth", 0):
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            yield
        finally:
            _state.depth -= 1
        return
    pending: list[int] = []

    def hold(signum, _frame) -> None:
        if signum not in pending:
            pending.append(signum)

    previous = {}
    try:
        for sig in DEFERRED:
            previous[sig] = signal.signal(sig, hold)
    except ValueError:  # e.g. a signal this interpreter may not handle: give up deferring
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous = {}
    _state.depth = 1
    try:
        yield
    finally:
        _state.depth = 0
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _deliver(pending)


def _deliver(signals: list[int]) -> None:
    """Raise each held signal; the handler in force now runs (KeyboardInterrupt for Ctrl-C), even if an earlier one raised."""
    if signals:
        try:
            signal.raise_signal(signals[0])
        finally:
            _deliver(signals[1:])
