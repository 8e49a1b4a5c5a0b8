"""Raw-socket HTTP clients for the server tests (tests/test_serve_hardening.py, tests/test_web_security.py):
hand-made request bytes, and a slow-loris sender. Plain sockets, so nothing fixes a request up."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


def read_answer(sock: socket.socket, until_closed: bool = True) -> bytes:
    """What the server sends, until it closes (a reset counts as closed), or, with
    `until_closed=False`, until one whole answer (its Content-Length) has arrived."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if not until_closed and _complete(b"".join(chunks)):
                break
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def exchange(
    port: int, data: bytes, timeout: float, close_write: bool = False, until_closed: bool = True
) -> tuple[int, bytes, bytes, float]:
    """Send bytes as they are; (status or 0, head, body, seconds until the answer was read)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        answer = read_answer(sock, until_closed)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    return status, head, body, time.monotonic() - start


@dataclass
class SlowSender:
    sock: socket.socket
    start: float  # when the request head had been sent


@contextmanager
def slow_sender(port: int, head: bytes, interval: float, count: int, timeout: float) -> Iterator[SlowSender]:
    """A slow-loris client: sends `head`, then one byte every `interval` s (at most `count`, so
    it ends whatever happens) from a thread, until the block ends or the server cuts it off."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    stop = threading.Event()

    def trickle() -> None:
        for _ in range(count):
            if stop.wait(interval):
                return
            try:
                sock.sendall(b"X")
            except OSError:
                return

    thread = None
    try:
        sock.sendall(head)
        start = time.monotonic()
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        yield SlowSender(sock, start)
    finally:
        stop.set()
        sock.close()
        if thread is not None:
            thread.join(timeout=5)
