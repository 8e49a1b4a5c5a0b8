"""`loupe serve` as a user runs it: a real subprocess on a free loopback port, real model, real photos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from loupe.indexer.errors import LoupeError
from loupe.indexer.storage.locations import resolve_location
from loupe.retrieval.web.client import STATE_VERSION, state_file
from tests.conftest import wait_for_state

def http(state, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {state.token}", **(headers or {})}
    req = urllib.request.Request(f"{state.url}{path}", data=data, method=method, headers=headers)
    if data is not None and "Content-Type" not in headers:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def server(loupe, tiny_checkpoint, photo_dir):
    loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)
    proc = loupe.popen("serve", "--port", "0")
    path = state_file(resolve_location(loupe.home))
    try:
        yield wait_for_state(path, proc), proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def in_process(loupe, *args: str) -> subprocess.CompletedProcess:
    env_before = os.environ.get("LOUPE_NO_SERVER")
    os.environ["LOUPE_NO_SERVER"] = "1"
    try:
        return loupe(*args, ok=False)
    finally:
        if env_before is None:
            del os.environ["LOUPE_NO_SERVER"]
        else:
            os.environ["LOUPE_NO_SERVER"] = env_before


def assert_same_results(served: str, local: str, tol: float = 2e-6) -> None:
    """The same results, line by line; scores may differ in the last printed digit (FAISS in the
    server and numpy in a cold process sum in different orders: 0.9999995 prints 1.0 or 0.999999)."""
    a, b = served.splitlines(), local.splitlines()
    assert len(a) == len(b), (served, local)
    for x, y in zip(a, b):
        if x.startswith("{"):
            x, y = json.loads(x), json.loads(y)
            assert x.pop("score") == pytest.approx(y.pop("score"), abs=tol) and x == y
        elif x.split()[:1] and x.split()[0].isdigit():  # a table row: rank, score, the rest
            (ra, sa, *rest_a), (rb, sb, *rest_b) = x.split(), y.split()
            assert ra == rb and float(sa) == pytest.approx(float(sb), abs=tol) and rest_a == rest_b
        else:
            assert x == y


def test_search_goes_through_the_server_with_identical_output(server, loupe, photo_dir):
    state, proc, path = server
    assert state.catalog == resolve_location(loupe.home).url and state.model == "loupe-tiny"
    status, health = http(state, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["pid"] == proc.pid and health["queries"] == 0

    photo = sorted(photo_dir.iterdir())[3]
    queries = [
        ["a dog runs on the grass", "-k", "5", "--json"],
        ["a dog runs on the grass", "-k", "4"],
        [str(photo), "-k", "3", "--json"],
        ['"2:beach" + a dog - "people"', "--glob", "*.jpg", "--min-score", "-1", "--json"],
        ["children playing", "--in", str(photo_dir), "--after", "2000", "--json"],
    ]
    for n, args in enumerate(queries, 1):
        served = loupe("search", *args)
        assert http(state, "GET", "/health")[1]["queries"] == n  # answered by the server
        local = in_process(loupe, "search", *args)
        assert (served.returncode, served.stderr) == (local.returncode, local.stderr)
        assert_same_results(served.stdout, local.stdout)
    top = json.loads(loupe("search", str(photo), "-k", "1", "--json").stdout)
    assert top["path"] == str(photo) and top["score"] == pytest.approx(1.0, abs=1e-4)

    # a query error is the same one-line error either way
    bad = loupe("search", "a dog", "--after", "last week", ok=False)
    assert bad.returncode == 1 and bad.stderr == in_process(loupe, "search", "a dog", "--after", "last week").stderr
    assert bad.stderr.startswith("loupe: error: cannot read date")

    status, body = http(state, "POST", "/search", {"terms": [{"weight": 1, "kind": "text", "value": "a dog"}], "k": 2})
    assert status == 200 and [h["rank"] for h in body["hits"]] == [1, 2]


def test_server_picks_up_index_changes(server, loupe, photo_dir, flickr_images):
    state, proc, _ = server
    new = photo_dir / "late-arrival.jpg"
    shutil.copy2(sorted(flickr_images.iterdir())[100], new)
    assert "1 embedded" in loupe("index", photo_dir).stdout
    hit = json.loads(loupe("search", str(new), "-k", "1", "--json").stdout)
    assert hit["path"] == str(new) and http(state, "GET", "/health")[1]["queries"] == 1
    loupe("remove", new)
    paths = [json.loads(line)["path"] for line in loupe("search", "a photo", "-k", "20", "--json").stdout.splitlines()]
    assert str(new) not in paths and len(paths) == 12


def test_server_refuses_foreign_requests(server):
    state, _, _ = server
    status, _ = http(state, "GET", "/health", headers={"Host": "evil.example:80"})
    assert status == 403
    status, body = http(state, "POST", "/search", {"terms": []}, headers={"Content-Type": "text/plain"})
    assert status == 415
    status, body = http(state, "GET", "/nope")
    assert status == 404
    with urllib.request.urlopen(f"{state.url}/", timeout=60) as resp:  # the page: on 127.0.0.1, no token needed
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")


def test_clean_shutdown_and_fallback(server, loupe):
    state, proc, path = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert "server stopped" in err and f"open http://127.0.0.1:{state.port}/#token={state.token}" in err
    assert not path.exists()
    out = loupe("search", "a dog", "-k", "2")  # no server: searched in-process
    assert len(out.stdout.splitlines()) == 3


def test_stale_state_file_is_ignored(loupe, tiny_checkpoint, photo_dir):
    loupe("index", photo_dir, "--checkpoint", tiny_checkpoint)
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = state_file(resolve_location(loupe.home))
    path.write_text(json.dumps({
        "pid": dead.pid, "port": 9, "catalog": resolve_location(loupe.home).url, "model": "loupe-tiny",
        "pretrained": None, "checkpoint": str(tiny_checkpoint), "device": "auto", "started": 0, "version": STATE_VERSION,
        "token": "x",
    }))
    assert len(loupe("search", "a dog", "-k", "2").stdout.splitlines()) == 3


def test_trimmed_text_encoding_matches_open_clip(tiny_encoder):
    """Dropping the padding after end-of-text (what makes warm queries fast) changes no vector."""
    import torch

    from loupe.indexer.models.encoder import encode_text_trimmed

    texts = ["a dog", "two children play on a sandy beach", "x " * 40]  # short, longer, truncated
    tokens = tiny_encoder.tokenizer(texts)
    with torch.inference_mode():
        full = tiny_encoder.model.encode_text(tokens)
        for i in range(len(texts)):
            one = encode_text_trimmed(tiny_encoder.model, tokens[i : i + 1])
            assert torch.allclose(one, full[i : i + 1], atol=1e-5)
        assert torch.allclose(encode_text_trimmed(tiny_encoder.model, tokens[:2]), full[:2], atol=1e-5)


def test_bf16_query_text_tower(tiny_checkpoint, tiny_encoder, flickr_images):
    """bf16 text weights give the fp32 vectors to ~1e-3 and leave the image tower alone."""
    import torch


    from loupe.indexer.models.encoder import load_encoder

    from loupe.indexer.models.spec import make_spec
    from loupe.indexer.pipeline.imageio import decode_image

    texts = ["a dog runs on the grass", "two children play on a sandy beach", "a red car"]
    reference = tiny_encoder.encode_texts(texts)
    pixels = torch.stack([
        decode_image(p.read_bytes(), tiny_encoder.image_size, tiny_encoder.preprocess)[0]
        for p in sorted(flickr_images.iterdir())[:4]
    ])
    images = tiny_encoder.encode_images(pixels)

    fresh = load_encoder(make_spec(None, None, tiny_checkpoint), "cpu")  # cast in place: not the shared fixture
    assert fresh.set_text_precision("fp32") == "fp32"
    # fp32 stays fp32: equal to rounding (a fresh copy of the weights may sit at other addresses,
    # which can change a BLAS kernel's path), far below the ~1e-3 that bf16 weights move a vector
    assert np.allclose(fresh.encode_texts(texts), reference, rtol=0, atol=1e-6)
    with pytest.raises(LoupeError, match="text precision"):
        fresh.set_text_precision("fp8")
    assert fresh.set_text_precision("bf16") == "bf16" == fresh.text_precision
    half = fresh.encode_texts(texts)
    assert half.dtype == np.float32 and np.allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
    cosines = (half * reference).sum(axis=1)
    assert cosines.min() > 0.999 and np.abs(half - reference).max() > 1e-4  # close, and really bf16
    assert np.allclose(fresh.encode_images(pixels), images, rtol=0, atol=1e-6)  # image tower untouched
    # the ranking of captions for each image barely moves
    assert ((images @ half.T).argmax(axis=1) == (images @ reference.T).argmax(axis=1)).all()

    auto = load_encoder(make_spec(None, None, tiny_checkpoint), "cpu")
    assert auto.set_text_precision("auto") == "fp32" == auto.spec.text_precision  # on every CPU: bf16 is an opt-in


def test_search_uses_a_server_only_with_the_same_text_precision(tiny_checkpoint):
    from loupe.retrieval.web.client import ServerState, _serves_model

    state = ServerState(
        pid=1, port=9, catalog="sqlite:///x", model="loupe-tiny", pretrained=None, checkpoint=str(tiny_checkpoint),
        device="auto", started=0.0, text_precision="bf16",
    )
    assert _serves_model(state, None, None, None, "auto", "auto")
    assert _serves_model(state, None, None, None, "auto", "bf16")
    assert not _serves_model(state, None, None, None, "auto", "fp32")


def test_idle_client_does_not_hold_the_server(server):
    """Requests are answered one at a time; a client that connects and sends nothing is dropped."""
    import socket

    from loupe.retrieval.engine.requests import REQUEST_TIMEOUT

    state, _, _ = server
    with socket.create_connection(("127.0.0.1", state.port)):
        start = time.monotonic()
        status, health = http(state, "GET", "/health")
        assert status == 200 and health["text_precision"] in ("fp32", "bf16", "fp16")  # fp16: a CUDA host
        assert time.monotonic() - start < REQUEST_TIMEOUT + 10
