"""The web API of `loupe serve`, in process (Starlette's TestClient, no socket), over a real index:
real photos, the tiny real model, real FAISS. Security rules have their own file
(tests/test_web_security.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.conftest import WEB_DATES

TOKEN = "t" * 43
PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # what the page sends on every API request (the token from the printed URL)


def make_service(home, encoder):
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.engine.search import Searcher
    from loupe.retrieval.engine.service import SearchService

    searcher = Searcher(Store.open(home=home, writer=False, map_files=False), encoder)
    return SearchService(searcher)


@pytest.fixture(scope="module")
def app(web_index, tmp_path_factory):
    from loupe.retrieval.web.app import create_app

    service = make_service(web_index.home, web_index.encoder)
    return create_app(service, token=TOKEN, port=PORT, thumbs_dir=tmp_path_factory.mktemp("thumbs"))


@pytest.fixture(scope="module")
def client(app):
    from starlette.testclient import TestClient

    with TestClient(app, base_url=BASE, raise_server_exceptions=False, headers=AUTH) as c:
        yield c


def search(client, **body) -> dict:
    r = client.post("/api/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def by_name(client, name: str) -> dict:
    results = search(client, q="", sort="newest", limit=200, collapse=False)["results"]
    return next(r for r in results if r["name"] == name)


# ---- search and paging ----------------------------------------------------------------------


def test_search_result_fields(client, web_index):
    answer = search(client, q="a dog runs on the grass", limit=5)
    assert set(answer) == {"results", "offset", "limit", "has_more", "took_ms"}
    assert answer["offset"] == 0 and answer["limit"] == 5 and answer["has_more"] is True and answer["took_ms"] >= 0
    first = answer["results"][0]
    assert set(first) == {"id", "name", "path", "folder", "score", "width", "height", "size", "date", "date_source",
                          "duplicates", "thumb", "preview", "kind"}
    assert first["kind"] == "image"  # a video moment's has kind "video" and its times (tests/test_video.py)
    path = web_index.photos / first["path"]
    assert path.is_file() and first["name"] == path.name and first["folder"] == str(path.parent)
    assert first["size"] == path.stat().st_size and first["thumb"].startswith(f"/api/thumb/{first['id']}?h=")
    assert first["preview"].startswith(f"/api/photo/{first['id']}?exp=") and "&sig=" in first["preview"]  # signed for an <img>
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)


def test_scores_match_the_cli_search(client, web_index):
    """The web ranking is the library's: same files, same scores as `Searcher.search`."""
    from loupe.retrieval.engine.query import parse_query

    searcher = client.app.state.web.service.searcher
    hits = searcher.search(parse_query(["children playing"]), k=8)
    web = search(client, q="children playing", limit=8)["results"]
    assert [r["path"] for r in web] == [h.fields["path"] for h in hits]
    assert np.allclose([r["score"] for r in web], [h.score for h in hits], atol=1e-5)


def test_paging_continues_without_overlap_or_encoding(client, app):
    web = app.state.web.web
    whole = search(client, q="people in a city street", limit=10)["results"]
    before = web.encodings
    page1 = search(client, q="people in a city street", limit=4)
    page2 = search(client, q="people in a city street", limit=4, offset=4)
    page3 = search(client, q="people in a city street", limit=4, offset=8)
    assert web.encodings == before  # the query vector was cached: pages cost no encoding
    ids = [r["id"] for p in (page1, page2, page3) for r in p["results"]]
    assert len(ids) == len(set(ids)) and ids[:10] == [r["id"] for r in whole]
    assert page1["has_more"] and page2["has_more"]
    n = len(search(client, q="", sort="newest", limit=200)["results"])  # every distinct visible photo
    last = search(client, q="people in a city street", limit=4, offset=n - 2)
    assert len(last["results"]) == 2 and last["has_more"] is False
    assert search(client, q="people in a city street", limit=4, offset=n + 5)["results"] == []


def test_paging_past_the_first_ranked_depth(client, app, monkeypatch):
    """A page beyond what was ranked extends the same ranking (never a hard cap)."""
    web = app.state.web.web
    web._rankings.clear()
    calls = []
    original = web.searcher.extend

    def counting(ranking, need):
        calls.append(need)
        return original(ranking, need)

    monkeypatch.setattr(web.searcher, "extend", counting)
    first = search(client, q="a dog", limit=2)["results"]  # ranked as deep as the first page only
    deeper = search(client, q="a dog", limit=2, offset=10)["results"]
    assert len(calls) >= 2 and len(deeper) == 2
    whole = search(client, q="a dog", limit=12)["results"]
    assert [r["id"] for r in first] == [r["id"] for r in whole[:2]]
    assert [r["id"] for r in deeper] == [r["id"] for r in whole[10:12]]


def test_collapse_identical_files(client, web_index):
    collapsed = search(client, q="", sort="newest", limit=200)["results"]
    every = search(client, q="", sort="newest", limit=200, collapse=False)["results"]
    assert len(every) == len(collapsed) + 1  # b/dup.jpg is a copy of a photo in a/
    dup = [r for r in collapsed if r["duplicates"] == 1]
    assert len(dup) == 1 and all(r["duplicates"] == 0 for r in every)
    names = {r["name"] for r in every}
    assert "dup.jpg" in names and "broken.jpg" not in names
    query = search(client, q="a dog", limit=200)["results"]
    assert len(query) == len(collapsed) and sum(r["duplicates"] for r in query) == 1
    assert len(search(client, q="a dog", limit=200, collapse=False)["results"]) == len(every)


def test_folder_and_date_filters(client, web_index):
    a = str(web_index.photos / "a")
    in_a = search(client, q="a dog", folder=a, limit=200, collapse=False)["results"]
    assert in_a and all(r["folder"] == a for r in in_a)
    assert len(in_a) == 8  # 6 photos, rotated.jpg and victim.jpg (broken.jpg was skipped)
    y, m, d = WEB_DATES["b"]
    after = search(client, q="a dog", after=f"{y}-{m:02d}", limit=200, collapse=False)["results"]
    assert {r["folder"] for r in after} == {str(web_index.photos / "b")} and len(after) == 7
    before = search(client, q="", sort="oldest", before="2019", limit=200)["results"]  # through 2019
    assert [r["name"] for r in before] == ["rotated.jpg"] and before[0]["date_source"] == "taken"
    modified = search(client, q="", sort="oldest", before="2019", date_field="modified", limit=200)["results"]
    assert modified == []
    r = client.post("/api/search", json={"q": "a dog", "after": "last week"})
    assert r.status_code == 400 and "cannot read date" in r.json()["error"]
    r = client.post("/api/search", json={"q": "a dog", "folder": "/etc"})
    assert r.status_code == 400 and "not an indexed folder" in r.json()["error"]


def test_min_score_and_date_sort_of_a_query(client):
    ranked = search(client, q="a dog", limit=200)["results"]
    cut = (ranked[4]["score"] + ranked[5]["score"]) / 2  # between the 5th and the 6th
    above = search(client, q="a dog", min_score=cut, limit=200)["results"]
    assert [r["id"] for r in above] == [r["id"] for r in ranked[:5]]
    newest = search(client, q="a dog", min_score=cut, sort="newest", limit=200)["results"]
    assert {r["id"] for r in newest} == {r["id"] for r in above}
    dates = [r["date"] for r in newest]
    assert dates == sorted(dates, reverse=True)


def test_browse_by_date_needs_no_model(client, app):
    web = app.state.web.web
    before = web.encodings
    newest = search(client, q="", sort="newest", limit=200, collapse=False)["results"]
    oldest = search(client, q="", sort="oldest", limit=200, collapse=False)["results"]
    assert web.encodings == before
    assert [r["date"] for r in newest] == sorted(r["date"] for r in newest)[::-1]
    assert [r["date"] for r in oldest] == sorted(r["date"] for r in oldest)
    assert {r["id"] for r in oldest} == {r["id"] for r in newest} and len(newest) == 15
    assert all(r["score"] is None for r in newest)


def test_caption_search(client):
    answer = search(client, q="a dog in the snow", target="captions", limit=5)
    assert len(answer["results"]) == 5
    first = answer["results"][0]
    assert set(first) >= {"id", "text", "score", "source"} and first["source"].endswith("captions.json")


def test_query_grammar_and_web_image_terms(client):
    """Weights and +/- as in the CLI; file paths are refused; photo:ID is the stored vector."""
    for q in ("./x.jpg", "/etc/passwd.jpg", 'img:"/etc/passwd"', "~/a.png", "../../a.jpg", "holiday.jpg"):
        r = client.post("/api/search", json={"q": q})
        assert r.status_code == 400 and "cannot name files" in r.json()["error"], (q, r.text)
    r = client.post("/api/search", json={"q": "photo:999999"})
    assert r.status_code == 404 and "no photo" in r.json()["error"]
    r = client.post("/api/search", json={"q": "upload:abcdef"})
    assert r.status_code == 404 and "upload" in r.json()["error"]
    r = client.post("/api/search", json={"q": '"a dog" - "a dog"'})
    assert r.status_code == 400 and "cancel" in r.json()["error"]
    quoted = search(client, q='"photo:1"', limit=3)["results"]  # quoted: text, as in the CLI
    assert len(quoted) == 3


def test_more_like_this_uses_the_stored_vector(client, app):
    from loupe.indexer.storage.catalog import IMAGE

    searcher = app.state.web.service.searcher
    target = search(client, q="", sort="newest", limit=1)["results"][0]
    before = app.state.web.web.encodings
    similar = search(client, q=f"photo:{target['id']}", limit=6)["results"]
    assert app.state.web.web.encodings == before  # no re-embedding
    assert similar[0]["id"] == target["id"] and similar[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # the same ranking as a FAISS search with the stored vector
    photo = app.state.web.web.photo(target["id"])
    stored = searcher.store.catalog.load_vectors([photo.vector_id], searcher.meta.dim)[0]
    scores, ids = searcher.store.vector_index(IMAGE).search(stored[None, :], 6)
    assert np.allclose([r["score"] for r in similar], scores[0][: len(similar)], atol=1e-5)
    # weights and operators combine it with text exactly like the CLI's image terms
    mixed = search(client, q=f'2:photo:{target["id"]} - "a dog"', limit=3)["results"]
    text = searcher.encoder.encode_texts(["a dog"])[0]
    vec = 2 * stored - text
    vec /= np.linalg.norm(vec)
    s2, _ = searcher.store.vector_index(IMAGE).search(vec[None, :], 3)
    assert np.allclose([r["score"] for r in mixed], s2[0], atol=1e-5)


def test_web_query_grammar():
    """upload:ID and photo:ID are image terms in a web query only; paths are refused there."""
    from loupe.indexer.errors import LoupeError
    from loupe.retrieval.engine.query import Term, parse_query

    assert parse_query(['2:upload:ab12cd + "at night"'], web=True) == [Term(2.0, "image", "upload:ab12cd"), Term(1.0, "text", "at night")]
    assert parse_query(['photo:12 - "people"'], web=True) == [Term(1.0, "image", "photo:12"), Term(-1.0, "text", "people")]
    assert parse_query(["0.5:photo:7"], web=True) == [Term(0.5, "image", "photo:7")]
    assert parse_query(["a dog - not a cat"], web=True) == parse_query(["a dog - not a cat"]) == [Term(1.0, "text", "a dog - not a cat")]
    assert parse_query(['"photo:12"'], web=True) == [Term(1.0, "text", "photo:12")]
    assert parse_query(["photo:12"]) == [Term(1.0, "text", "photo:12")]  # the CLI is unchanged
    for q in ("./x.jpg", 'img:"x"', "/etc/passwd", "dog.png", "photo:12 at night.jpg"):
        with pytest.raises(LoupeError, match="cannot name files"):
            parse_query([q], web=True)
    with pytest.raises(LoupeError, match="stand alone"):
        parse_query(['photo:12 "at night"'], web=True)


# ---- uploads ------------------------------------------------------------------------------


def test_upload_query(client, app, web_index, flickr_images):
    searcher = app.state.web.service.searcher
    new = sorted(flickr_images.iterdir())[40]  # not indexed
    r = client.post("/api/uploads", content=new.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    up = r.json()
    with Image.open(new) as img:
        assert (up["width"], up["height"]) == img.size
    results = search(client, q=f"upload:{up['id']}", limit=4)["results"]
    expected = searcher.search(searcher_terms(new), k=4)  # the CLI's image query of the same file
    assert [r["path"] for r in results] == [h.fields["path"] for h in expected]
    assert np.allclose([r["score"] for r in results], [h.score for h in expected], atol=1e-4)
    # multipart works too, and an indexed photo's bytes give that photo first
    indexed = web_index.photos / "b" / sorted(p.name for p in (web_index.photos / "b").iterdir())[0]
    r = client.post("/api/uploads", files={"file": (indexed.name, indexed.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    top = search(client, q=f'upload:{r.json()["id"]} + 0.5:"a photo"', limit=1)["results"][0]
    assert top["score"] > 0.5
    same = search(client, q=f"upload:{r.json()['id']}", limit=1)["results"][0]
    assert same["path"] == str(indexed) and same["score"] == pytest.approx(1.0, abs=1e-4)


def searcher_terms(path):
    from loupe.retrieval.engine.query import parse_query

    return parse_query([str(path)])


def test_bad_uploads_are_4xx(client):
    r = client.post("/api/uploads", content=b"not an image at all", headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "cannot use the upload" in r.json()["error"]
    r = client.post("/api/uploads", content=b"hello", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/api/uploads", content=b"", headers={"Content-Type": "image/png"})
    assert r.status_code == 400
    r = client.post("/api/uploads", files={"other": ("x.jpg", b"123", "image/jpeg")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]


# ---- one photo: details, captions, thumbnail, preview --------------------------------------


def test_photo_details(client, web_index):
    rotated = by_name(client, "rotated.jpg")
    r = client.get(f"/api/photos/{rotated['id']}")
    assert r.status_code == 200
    info = r.json()
    assert {k: info[k] for k in rotated if k != "score"} == {k: v for k, v in rotated.items() if k != "score"}
    assert info["exif"] == {"camera": "Canon EOS 5D", "taken_at": "2019-05-01T10:00:00"}
    assert info["content_hash"] and info["available"] is True and info["date_source"] == "taken"
    original = by_name(client, "dup.jpg")
    dup = client.get(f"/api/photos/{original['id']}").json()
    assert dup["duplicates"] == 1 and len(dup["duplicate_paths"]) == 1
    assert client.get("/api/photos/99999999").status_code == 404


def test_captions_for_a_photo(client, web_index, tmp_path, tiny_encoder):
    photo = by_name(client, sorted(p.name for p in (web_index.photos / "a").iterdir() if p.name[0].isdigit())[0])
    r = client.get(f"/api/photos/{photo['id']}/captions?limit=7")
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 7 and results[0]["text"]
    scores = [c["score"] for c in results]
    assert scores == sorted(scores, reverse=True)
    assert client.get(f"/api/photos/{photo['id']}/captions?limit=0").status_code == 400

    # an index without captions: a clear 404
    from starlette.testclient import TestClient

    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.web.app import create_app

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(web_index.path(f"a/{photo['name']}").read_bytes())
    index_folder(Store.open(home=tmp_path / "h"), tiny_encoder, folder, workers=1)
    other = create_app(make_service(tmp_path / "h", tiny_encoder), token=TOKEN, port=PORT, thumbs_dir=tmp_path / "t")
    with TestClient(other, base_url=BASE, headers=AUTH) as c:
        pid = c.post("/api/search", json={"q": "", "sort": "newest"}).json()["results"][0]["id"]
        r = c.get(f"/api/photos/{pid}/captions")
        assert r.status_code == 404 and "no caption corpus" in r.json()["error"]
        r = c.post("/api/search", json={"q": "a dog", "target": "captions"})
        assert r.status_code == 400 and "holds no captions" in r.json()["error"]


def test_thumbnails_are_made_once_and_cached(client, app):
    from loupe.retrieval.web.media import THUMB_SIDE, THUMB_TYPE

    web = app.state.web
    photo = by_name(client, "dup.jpg")
    digest = client.get(f"/api/photos/{photo['id']}").json()["content_hash"]
    cache_file = web.thumbs.path(digest)
    assert not cache_file.exists()
    made = web.thumbs_made
    r = client.get(photo["thumb"])
    assert r.status_code == 200 and r.headers["content-type"] == THUMB_TYPE
    assert r.headers["etag"] == f'"{digest}"' and r.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert web.thumbs_made == made + 1 and cache_file.read_bytes() == r.content
    assert not list(cache_file.parent.glob(".tmp-*"))  # written atomically, nothing left behind
    with Image.open(io.BytesIO(r.content)) as img:
        assert min(img.size) <= THUMB_SIDE and img.size[0] / img.size[1] == pytest.approx(photo["width"] / photo["height"], rel=0.05)
    again = client.get(photo["thumb"])
    assert again.status_code == 200 and again.content == r.content and web.thumbs_made == made + 1  # not decoded again
    r304 = client.get(photo["thumb"], headers={"If-None-Match": f'"{digest}"'})
    assert r304.status_code == 304 and r304.content == b"" and web.thumbs_made == made + 1
    # without the matching hash prefix: cacheable only with revalidation
    r = client.get(f"/api/thumb/{photo['id']}?h=0000")
    assert r.status_code == 200 and r.headers["cache-control"] == "private, no-cache"
    # the identical copy shares the cached thumbnail
    original = [x for x in search(client, q="", sort="newest", limit=200, collapse=False)["results"]
                if x["id"] != photo["id"] and x["thumb"].split("h=")[1].split("&")[0] == photo["thumb"].split("h=")[1].split("&")[0]]
    assert len(original) == 1
    assert client.get(original[0]["thumb"]).content == r.content and web.thumbs_made == made + 1


def test_exif_rotation_in_thumbnail_and_preview(client, web_index):
    rotated = by_name(client, "rotated.jpg")
    path = web_index.path("a/rotated.jpg")
    with Image.open(path) as img:
        stored = img.size
        shown = ImageOps.exif_transpose(img).convert("RGB")
    assert (rotated["width"], rotated["height"]) == (stored[1], stored[0])
    r = client.get(rotated["preview"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.headers["etag"]
    with Image.open(io.BytesIO(r.content)) as img:
        preview = img.convert("RGB")
    assert preview.size == shown.size
    diff = np.abs(np.asarray(preview, dtype=np.int16) - np.asarray(shown, dtype=np.int16)).mean()
    assert diff < 6  # the same picture, the same way up (JPEG noise only)
    top = np.asarray(preview)[: preview.size[1] // 4].mean()  # the dark band is on top once rotated
    assert top < 10 < np.asarray(preview)[preview.size[1] // 2 :].mean()
    thumb = client.get(rotated["thumb"])
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert img.size[0] < img.size[1] and np.asarray(img.convert("RGB"))[:5].mean() < 10
    # full=1: a rotated original is re-encoded upright; an upright one is sent as it is
    with Image.open(io.BytesIO(client.get(rotated["preview"] + "&full=1").content)) as img:
        assert img.size == shown.size
    plain = by_name(client, "dup.jpg")
    full = client.get(plain["preview"] + "&full=1")
    assert full.status_code == 200 and full.content == web_index.path("b/dup.jpg").read_bytes()
    etag = full.headers["etag"]
    assert client.get(plain["preview"] + "&full=1", headers={"If-None-Match": etag}).status_code == 304


def test_large_preview_is_capped(tmp_path):
    from loupe.retrieval.web.media import PREVIEW_SIDE, make_preview, make_thumbnail

    img = Image.new("RGB", (3000, 2000), (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    with Image.open(io.BytesIO(make_preview(buf.getvalue()).data)) as out:
        assert max(out.size) == PREVIEW_SIDE and out.size[0] / out.size[1] == pytest.approx(1.5, rel=0.01)
    with Image.open(io.BytesIO(make_thumbnail(buf.getvalue()).data)) as out:
        assert out.size == (384, 256)
    assert make_preview(buf.getvalue(), full=True).data == buf.getvalue()


# ---- the index ------------------------------------------------------------------------------


def test_status(client, web_index):
    r = client.get("/api/status?skipped_limit=5")
    assert r.status_code == 200
    s = r.json()
    assert s["images"] == {"ok": 15, "skipped": 1, "missing": 0, "distinct": 14, "bytes": s["images"]["bytes"]}
    assert s["captions"]["count"] == 60 and s["vectors"]["image"] == 14
    assert s["model"]["name"] == "loupe-tiny" and s["model"]["checkpoint"] and s["index_factory"]
    assert s["roots"][0]["path"] == str(web_index.photos) and s["roots"][0]["offline"] is None
    assert s["skipped"] == [{"path": str(web_index.path("a/broken.jpg")), "reason": s["skipped"][0]["reason"]}]
    assert s["skipped"][0]["reason"] and s["skip_reasons"][0]["count"] == 1 and s["updated"]
    assert client.get("/api/status?skipped_limit=0").json()["skipped"] == []
    assert client.get("/api/status?skipped_limit=x").status_code == 400


def test_folders(client, web_index):
    r = client.get("/api/folders")
    assert r.status_code == 200
    body = r.json()
    assert [f["path"] for f in body["roots"]] == [str(web_index.photos)]
    assert body["folders"] == [{"path": str(web_index.photos / "a"), "count": 8}, {"path": str(web_index.photos / "b"), "count": 7}]


def test_page_and_health(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    r = client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_index_changes_are_picked_up(tmp_path, tiny_encoder, flickr_images):
    """A running app sees `loupe index` changes at its next request (catalog generation)."""
    import shutil

    from starlette.testclient import TestClient

    from loupe.indexer.pipeline.indexing import index_folder
    from loupe.indexer.storage.store import Store
    from loupe.retrieval.web.app import create_app

    folder = tmp_path / "p"
    folder.mkdir()
    for src in sorted(flickr_images.iterdir())[50:53]:
        shutil.copy2(src, folder / src.name)
    writer = Store.open(home=tmp_path / "h")
    index_folder(writer, tiny_encoder, folder, workers=1)
    app = create_app(make_service(tmp_path / "h", tiny_encoder), token=TOKEN, port=PORT, thumbs_dir=tmp_path / "t")
    with TestClient(app, base_url=BASE, headers=AUTH) as c:
        assert len(c.post("/api/search", json={"q": "a dog"}).json()["results"]) == 3
        shutil.copy2(sorted(flickr_images.iterdir())[60], folder / "new.jpg")
        index_folder(writer, tiny_encoder, folder, workers=1)
        results = c.post("/api/search", json={"q": "a dog"}).json()["results"]
        assert len(results) == 4 and "new.jpg" in {r["name"] for r in results}
        assert c.get("/api/status").json()["images"]["ok"] == 4


# ---- the API description ------------------------------------------------------------------


def test_openapi_documents_exactly_the_mounted_routes(client, app):
    from starlette.routing import Mount, Route

    doc = client.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    mounted = set()
    for route in app.routes:
        if isinstance(route, Route):
            for method in route.methods - {"HEAD"}:
                mounted.add((route.path.replace("{id:int}", "{id}"), method))
        elif isinstance(route, Mount):  # the page's static files
            mounted |= {("/", "GET"), ("/{file}", "GET")}
    assert documented == mounted
    for path, ops in doc["paths"].items():
        for op in ops.values():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == set(__import__("re").findall(r"{(\w+)}", path))
            assert "path" not in {p["name"] for p in op.get("parameters", [])}  # no file path parameter anywhere
            assert any(code.startswith("2") for code in op["responses"])
    json.dumps(doc)
