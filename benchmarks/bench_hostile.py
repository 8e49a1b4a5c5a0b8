"""`loupe serve` under a mixed hostile load (issue 23), on loopback only.

    .venv/bin/python benchmarks/bench_hostile.py                      # ViT-B-32 (random weights), 60 s
    .venv/bin/python benchmarks/bench_hostile.py --model loupe-tiny --seconds 30   # quick

A home of `--photos` photos (flickr8k_800, or generated pictures when absent) is indexed with the
model's random-weight checkpoint, and a real `loupe serve` is started on 127.0.0.1. Its idle RSS is
read, then for `--seconds`, at the same time and bounded in count:

- uploaders (`--uploaders`, one after another each): high-bit-depth pictures, the worst of issue 23
  (a 9400x9400 float32 TIFF, 652 KB), a 16-bit 4000x4000 PNG, an EPS file;
- slow senders (`--slow`): a search request trickled a byte every 0.2 s (cut off at the deadline);
- refused requests held open (`--held`): a 2 GiB Content-Length without the token, then a byte a second;
- idle connections up to the server's cap;
- one client of normal searches (distinct sentences, then repeated), one after another.

Reported: normal-search latency p50/p99 (ms), the server's peak RSS (sampled every 20 ms from
/proc) against its idle RSS, and what the hostile clients got. Targets (issue 23): p99 <= 250 ms,
peak RSS <= 2x idle. Writes benchmarks/out/bench_hostile.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from common import FLICKR, checkpoint, load_average, machine, run_loupe, start_serve, stop_serve, write_json
from PIL import Image

HOST = "127.0.0.1"  # loopback only, always
SENTENCES = ["a dog runs on the grass", "children playing in the water", "a man on a bicycle", "two people at the beach",
             "a black and white dog", "a girl in a pink dress", "a crowd in the street", "a boat on a lake"]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build_home(workdir: Path, photos: int, ckpt: Path) -> Path:
    home, folder = workdir / "home", workdir / "photos"
    if (home / "built").exists():
        return home
    shutil.rmtree(workdir, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = sorted(FLICKR.glob("*.jpg"))[:photos] if FLICKR.is_dir() else []
    for src in sources:
        shutil.copy2(src, folder / src.name)
    rng = np.random.default_rng(0)
    for i in range(photos - len(sources)):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / f"gen{i}.jpg")
    run_loupe(["index", str(folder), "--checkpoint", str(ckpt)], home)
    (home / "built").write_text("ok")
    return home


def hostile_files(workdir: Path) -> list[tuple[str, bytes, str]]:
    out = []
    buf = io.BytesIO()
    Image.fromarray(np.full((9400, 9400), 0.5, np.float32), "F").save(buf, "TIFF", compression="tiff_adobe_deflate")
    out.append(("float32 TIFF 9400x9400", buf.getvalue(), "image/tiff"))
    buf = io.BytesIO()
    Image.fromarray((np.arange(4000 * 4000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(4000, 4000)).save(buf, "PNG", compress_level=1)
    out.append(("16-bit PNG 4000x4000", buf.getvalue(), "image/png"))
    out.append(("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n%%EOF\n", "image/png"))
    return out


def http(port: int, token: str, method: str, path: str, body: bytes = b"", ctype: str = "application/json", timeout: float = 120) -> tuple[int, bytes]:
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", f"Authorization: Bearer {token}", "Connection: close"]
    if method == "POST":
        head += [f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32", help="model with random weights (loupe-tiny: quick)")
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--uploaders", type=int, default=2)
    p.add_argument("--slow", type=int, default=8)
    p.add_argument("--held", type=int, default=16)
    p.add_argument("--idle", type=int, default=100, help="idle connections opened (the server caps them)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loupe-bench-hostile"))
    a = p.parse_args()

    ckpt = checkpoint(a.model)
    home = build_home(a.workdir / a.model, a.photos, ckpt)
    files = hostile_files(a.workdir)
    proc, state = start_serve(home, "--host", HOST)
    try:
        port, token = state.port, state.token
        for s in SENTENCES:  # warm: model, indices, query cache of these sentences
            http(port, token, "POST", "/api/search", json.dumps({"q": s, "limit": 60}).encode())
        time.sleep(1.0)
        idle = rss(proc.pid)
        stop = threading.Event()
        peak = [idle]
        outcomes: dict[str, list] = {"uploads": [], "slow": [], "held": [], "idle_refused": 0}

        def sampler():
            while not stop.is_set():
                peak[0] = max(peak[0], rss(proc.pid))
                time.sleep(0.02)

        def uploader(k: int):
            i = k
            while not stop.is_set():
                name, data, ctype = files[i % len(files)]
                if name.startswith("16-bit PNG"):
                    data += f"loupe-bench {k} {i}".encode()  # bytes after IEND: a new upload (content hash) every time
                t = time.monotonic()
                try:
                    status, body = http(port, token, "POST", "/api/uploads", data, ctype)
                except OSError as exc:
                    status, body = 0, str(exc).encode()
                outcomes["uploads"].append({"file": name, "status": status, "s": round(time.monotonic() - t, 3)})
                i += 1

        def slow_sender():
            while not stop.is_set():
                try:
                    with socket.create_connection((HOST, port), timeout=30) as s:
                        data = f"POST /api/search HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n".encode()
                        t = time.monotonic()
                        for byte in data:
                            s.sendall(bytes([byte]))
                            time.sleep(0.2)
                            if stop.is_set():
                                break
                        outcomes["slow"].append({"cut_off_after_s": None})
                except OSError:
                    outcomes["slow"].append({"cut_off_after_s": round(time.monotonic() - t, 2)})

        def held():
            while not stop.is_set():
                t = time.monotonic()
                try:
                    with socket.create_connection((HOST, port), timeout=30) as s:
                        s.sendall(f"POST /api/search HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {1 << 31}\r\n\r\n".encode())
                        while not stop.is_set():
                            s.sendall(b"x")
                            time.sleep(1.0)
                except OSError:
                    outcomes["held"].append({"closed_after_s": round(time.monotonic() - t, 2)})

        threads = [threading.Thread(target=sampler, daemon=True)]
        threads += [threading.Thread(target=uploader, args=(k,), daemon=True) for k in range(a.uploaders)]
        threads += [threading.Thread(target=slow_sender, daemon=True) for _ in range(a.slow)]
        threads += [threading.Thread(target=held, daemon=True) for _ in range(a.held)]
        idle_socks = []
        for _ in range(a.idle):
            try:
                idle_socks.append(socket.create_connection((HOST, port), timeout=5))
            except OSError:
                outcomes["idle_refused"] += 1
        for t in threads:
            t.start()
        time.sleep(1.0)  # the load is on
        latencies, statuses = [], []
        end = time.monotonic() + a.seconds
        n = 0
        while time.monotonic() < end:
            q = SENTENCES[n % len(SENTENCES)] if n % 2 else f"{SENTENCES[n % len(SENTENCES)]} number {n}"
            t = time.monotonic()
            status, _ = http(port, token, "POST", "/api/search", json.dumps({"q": q, "limit": 60}).encode())
            latencies.append(time.monotonic() - t)
            statuses.append(status)
            n += 1
            time.sleep(0.05)
        stop.set()
        for s in idle_socks:
            s.close()
        for t in threads:
            t.join(timeout=35)
        ms = sorted(1000 * x for x in latencies)
        uploads = outcomes["uploads"]
        result = {
            "machine": machine(), "load_average": load_average(), "model": a.model, "seconds": a.seconds,
            "searches": {"n": len(ms), "ok": statuses.count(200), "p50_ms": round(statistics.median(ms), 1),
                         "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1), "max_ms": round(ms[-1], 1)},
            "rss": {"idle_mb": round(idle / 2**20), "peak_mb": round(peak[0] / 2**20), "ratio": round(peak[0] / idle, 2)},
            "uploads": {name: {"n": sum(1 for u in uploads if u["file"] == name),
                               "statuses": sorted({u["status"] for u in uploads if u["file"] == name}),
                               "max_s": max((u["s"] for u in uploads if u["file"] == name), default=None)} for name, _, _ in files},
            "slow_senders_cut_off": len([s for s in outcomes["slow"] if s["cut_off_after_s"] is not None]),
            "held_refusals_closed_max_s": max((h["closed_after_s"] for h in outcomes["held"]), default=None),
            "held_refusals_closed": len(outcomes["held"]),
            "idle_connections_opened": len(idle_socks),
        }
        result["met"] = result["searches"]["p99_ms"] <= 250 and result["rss"]["ratio"] <= 2.0
        print(json.dumps(result, indent=2))
        write_json("bench_hostile.json", result)
    finally:
        stop_serve(proc)


if __name__ == "__main__":
    main()
