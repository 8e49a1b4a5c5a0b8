"""`loupe serve` on Starlette/uvicorn against the hand-written http.server it replaced.

    .venv/bin/python benchmarks/bench_serve.py                       # 10k and 100k vectors
    .venv/bin/python benchmarks/bench_serve.py --sizes 10000 --repeats 5   # quick

For each size, a home bound to ViT-B-32 (random weights: same speed as the pretrained model) is
filled with CLIP-like synthetic vectors (as bench_query.py builds it). Then, one server after the
other on the same index:

- baseline: the http.server `loupe serve` of `--baseline-ref` (default 5c895f7, the commit before
  the web page), its code extracted with `git archive` into a temporary folder and run from there;
- new: this checkout's `loupe serve` (uvicorn, Starlette).

Measured for each: the whole-process wall time of `loupe search "..." -k 10` from the shell while
the server runs (the CLI's fast path; the client is the same code as the server), medians over
`--repeats`; and the in-process latency of POST /search (the CLI's endpoint) over distinct
captions. For the new server also POST /api/search (first page of 60, the next page, browsing by
date) and, in process, how long a ~256 px thumbnail takes to make from photos of growing size.
Writes benchmarks/out/bench_serve.json.
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from common import PYTHON, REPO, size_sweep_parser, checkpoint, load_average, load_checkpoint, loupe_env, machine, median, start_serve, stop_serve, write_json

BASELINE_SECONDS = 0.19  # RESULTS.md: `loupe search` through the http.server `loupe serve`, whole process
TARGET_RATIO = 1.2


def extract(ref: str, into: Path) -> str | None:
    """The tree of `ref` in `into` (git archive); its commit, or None when git cannot give it."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True, check=True).stdout.strip()
        data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return commit


def entry(code: Path) -> str:
    """The module that runs the command in `code`: `loupe` since it is one package, `loupe.cli.main` before."""
    return "loupe" if (code / "loupe" / "__main__.py").exists() else "loupe.cli.main"


def start_server(code: Path, home: Path) -> tuple[subprocess.Popen, object]:
    """`loupe serve` of the checkout `code` on `home`, its on-disk query cache emptied first (no
    sentence of an earlier run is free)."""
    from loupe.indexer.storage.locations import resolve_location

    location = resolve_location(home)
    for suffix in ("", "-wal", "-shm"):
        (location.vector_dir / f"{location.prefix}query-cache.sqlite{suffix}").unlink(missing_ok=True)
    return start_serve(home, code=code, module=entry(code))


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(1000 * t for t in seconds)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2)}


def whole_process(code: Path, home: Path, queries: list[str], state, repeats: int) -> dict:
    """Wall time of `loupe search` as a fresh process while the server runs (checked: it answered)."""
    from loupe.retrieval.web.client import request

    before = request(state, "GET", "/health")[1]["queries"]
    walls = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        proc = subprocess.run(
            [PYTHON, "-m", entry(code), "search", queries[i % len(queries)], "-k", "10", "--home", str(home)],
            cwd=code, env=loupe_env(PYTHONPATH=str(code), LOUPE_NO_SERVER="0"), capture_output=True, text=True,
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        if i:  # the first run warms the page cache
            walls.append(wall)
    served = request(state, "GET", "/health")[1]["queries"] - before
    if served != repeats + 1:
        raise RuntimeError(f"only {served} of {repeats + 1} searches went through the server")
    return {"median_s": round(median(walls), 3), "min_s": round(min(walls), 3), "runs": [round(w, 3) for w in walls]}


def cli_endpoint(state, sentences: list[str]) -> dict:
    from loupe.retrieval.web.client import request

    times = []
    for s in sentences:
        body = {"terms": [{"weight": 1.0, "kind": "text", "value": s}], "target": "image", "k": 10}
        t = time.perf_counter()
        status, answer = request(state, "POST", "/search", body)
        times.append(time.perf_counter() - t)
        assert status == 200 and len(answer["hits"]) == 10, answer
    return percentiles(times[3:])


def web_api(state, sentences: list[str]) -> dict:
    """POST /api/search: a new query's first page, its next page (cached query vector), browsing by date."""
    import http.client

    def post(body: dict) -> tuple[float, dict]:
        conn = http.client.HTTPConnection(state.connect_host, state.port, timeout=60)
        data = json.dumps(body)
        t = time.perf_counter()
        conn.request("POST", "/api/search", body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        elapsed = time.perf_counter() - t
        conn.close()
        assert resp.status == 200, answer
        return elapsed, answer

    first, second, browse, server_ms = [], [], [], []
    for s in sentences:
        s = f"a photo of {s}"  # not the CLI endpoint's sentence: the query cache they share would answer it
        t, answer = post({"q": s, "limit": 60})
        first.append(t)
        server_ms.append(answer["took_ms"])
        assert len(answer["results"]) == 60 and answer["has_more"]
        t, answer = post({"q": s, "limit": 60, "offset": 60})
        second.append(t)
        assert len(answer["results"]) == 60
    for i in range(10):
        t, answer = post({"q": "", "sort": "newest" if i % 2 else "oldest", "limit": 60, "offset": 60 * i})
        browse.append(t)
    return {
        "first_page_of_60": percentiles(first[3:]),
        "first_page_server_ms_p50": round(statistics.median(server_ms[3:]), 2),
        "next_page_of_60": percentiles(second[3:]),
        "browse_by_date_page_of_60": percentiles(browse[1:]),
    }


def thumbnails(sizes_mp: list[float], repeats: int = 5) -> list[dict]:
    """Milliseconds to make one ~256 px thumbnail (decode with draft, EXIF, resize, WebP) by photo size."""
    import numpy as np
    from PIL import Image

    from loupe.retrieval.web.media import make_thumbnail

    rng = np.random.default_rng(0)
    out = []
    for mp in sizes_mp:
        w = int((mp * 1e6 * 4 / 3) ** 0.5)
        h = int(w * 3 / 4)
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish content, like a photo
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            thumb = make_thumbnail(data)
            times.append(time.perf_counter() - t)
        out.append({"megapixels": round(w * h / 1e6, 1), "jpeg_bytes": len(data), "thumb_bytes": len(thumb.data),
                    "median_ms": round(1000 * median(times), 1)})
        print(f"  thumbnail from {w}x{h}: {out[-1]['median_ms']} ms")
    return out


def main() -> None:
    from bench_query import SHORT_QUERIES, ClipLike, build_home, captions

    p = size_sweep_parser(__doc__, "10000,100000")
    p.add_argument("--repeats", type=int, default=10, help="whole-process `loupe search` runs per server")
    p.add_argument("--queries", type=int, default=40, help="in-process requests per endpoint")
    p.add_argument("--baseline-ref", default="5c895f7", help="git commit of the http.server `loupe serve`")
    p.add_argument("--model", default="ViT-B-32", help="model (random weights); loupe-tiny isolates the HTTP stack's cost")
    p.add_argument("--thumb-sizes", default="0.3,3,12,24", help="photo sizes (megapixels) for the thumbnail timing")
    a = p.parse_args()

    encoder = load_checkpoint(checkpoint(a.model))
    world = ClipLike(dim=encoder.dim, spread=1.5)
    workdir = a.workdir if a.model == "ViT-B-32" else a.workdir / a.model
    sentences = captions(a.queries)
    out: dict = {"machine": machine(), "model": a.model, "baseline_ref": a.baseline_ref, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="loupe-baseline-") as tmp:
        old_code = Path(tmp)
        commit = extract(a.baseline_ref, old_code)
        out["baseline_commit"] = commit
        servers = ([("http.server", old_code)] if commit else []) + [("uvicorn", REPO)]
        for n in a.sizes:
            print(f"{n} vectors (load {load_average()})")
            home, _, _ = build_home(n, workdir, encoder, world)
            row: dict = {"vectors": n}
            for name, code in servers:
                proc, state = start_server(code, home)
                try:
                    row[name] = {
                        "loupe_search_whole_process": whole_process(code, home, SHORT_QUERIES, state, a.repeats),
                        "post_search_in_process": cli_endpoint(state, sentences),
                    }
                    if name == "uvicorn":
                        row[name]["web_api"] = web_api(state, sentences)
                finally:
                    stop_serve(proc)
                print(f"  {name}: {row[name]}")
            new = row["uvicorn"]["loupe_search_whole_process"]["median_s"]
            row["ratio_to_0.19s_baseline"] = round(new / BASELINE_SECONDS, 3)
            if "http.server" in row:
                row["ratio_to_http_server_same_run"] = round(new / row["http.server"]["loupe_search_whole_process"]["median_s"], 3)
            row["met"] = row.get("ratio_to_http_server_same_run", row["ratio_to_0.19s_baseline"]) <= TARGET_RATIO
            row["load_average"] = load_average()
            print(f"  ratios: {row.get('ratio_to_http_server_same_run')} (same run), {row['ratio_to_0.19s_baseline']} (vs 0.19 s)")
            out["sizes"].append(row)
    out["thumbnails"] = thumbnails([float(x) for x in a.thumb_sizes.split(",")])
    write_json("bench_serve.json" if a.model == "ViT-B-32" else f"bench_serve-{a.model}.json", out)


if __name__ == "__main__":
    main()
