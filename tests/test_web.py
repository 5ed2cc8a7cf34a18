"""The web API through the ASGI test client, against a real database holding shared room photos."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from imsearch.cli import cli
from imsearch.web import create_app
from tests.conftest import ROOMS, copy_photos, scratch_database

PER_CLASS = 5


def unseen(cls: str = "kitchen") -> Path:
    """A room photo from the shared test split: never stored."""
    return sorted((ROOMS / "test" / cls).glob("*.jpg"))[0]


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid all-black 1-bit PNG of width x height: 400 M pixels in a file of about 60 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def library(server_url, weights, tmp_path_factory):
    """One database with 5 shared base photos per class, shared by the read-only tests of this module."""
    from imsearch import Imsearch

    photos = copy_photos(tmp_path_factory.mktemp("web") / "photos", PER_CLASS)
    with scratch_database(server_url, f"imsearch_test_web_{os.getpid()}") as url:
        with Imsearch(url, weights=weights, device="cpu") as app:
            result = app.ingest(photos)
            assert result.added == 5 * PER_CLASS and not result.failed
            yield app, url, photos


def web_client(app, **options) -> TestClient:
    """A test client of the page, under a host name the page answers to (loopback)."""
    return TestClient(create_app(app, **options), base_url="http://localhost")


@pytest.fixture(scope="module")
def client(library):
    with web_client(library[0]) as c:
        yield c


def upload(client: TestClient, data: bytes, name: str = "photo.jpg", mime: str = "image/jpeg", **form: object):
    return client.post("/api/find", files={"file": (name, data, mime)}, data={k: str(v) for k, v in form.items()})


def without_urls(item: dict) -> dict:
    """An /api/find item as `find --json` prints it: no URLs, class source or timings."""
    out = {k: v for k, v in item.items() if k not in ("class_source", "seconds")}
    out["matches"] = [{k: v for k, v in m.items() if k not in ("image", "thumbnail")} for m in item["matches"]]
    return out


def cli_find(url: str, weights: str, *args: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["--database-url", url, "find", *args, "--json", "--device", "cpu"],
                                env={"IMSEARCH_WEIGHTS": weights}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("mode, cls", [("all", None), ("same", "kitchen"), ("other", "kitchen")])
def test_api_find_agrees_with_cli_find_json(client, library, weights, tmp_path, mode, cls):
    _, url, _ = library
    query = tmp_path / "upload" / "query.jpg"  # a folder that is no stored class: the CLI cannot guess one
    query.parent.mkdir()
    shutil.copy(unseen(), query)
    extra = ["--mode", mode] + (["--class", cls] if cls else [])
    [expected] = cli_find(url, weights, str(query), *extra)

    response = upload(client, query.read_bytes(), "query.jpg", mode=mode, **({"class": cls} if cls else {}))
    assert response.status_code == 200, response.text
    [item] = response.json()
    assert item["query"] == "query.jpg"
    assert without_urls(item) == {**expected, "query": "query.jpg"}
    assert len(item["matches"]) == 5
    assert item["seconds"]["total"] >= item["seconds"]["embed"] > 0


def test_matches_carry_urls_of_their_stored_image_and_thumbnail(client):
    [item] = upload(client, unseen().read_bytes()).json()
    for m in item["matches"]:
        assert m["image"] == f"http://localhost/images/{m['id']}"
        assert m["thumbnail"] == f"http://localhost/images/{m['id']}/thumbnail"
    first = item["matches"][0]
    original = client.get(first["image"])
    assert original.status_code == 200 and original.headers["content-type"] == "image/jpeg"
    assert original.content == Path(first["path"]).read_bytes()
    thumb = client.get(first["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 320
    again = client.get(first["thumbnail"], headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304


def test_class_modes_default_to_the_class_of_the_top_match(client):
    data = unseen("bedroom").read_bytes()
    [everything] = upload(client, data, mode="all").json()
    top_class = everything["matches"][0]["class"]
    assert everything["query_class"] is None and everything["class_source"] is None

    [same] = upload(client, data, mode="same").json()
    assert same["query_class"] == top_class and same["class_source"] == "top match"
    assert [m["class"] for m in same["matches"]] == [top_class] * 5

    [other] = upload(client, data, mode="other").json()
    assert other["query_class"] == top_class and other["class_source"] == "top match"
    assert len(other["matches"]) == 5 and top_class not in {m["class"] for m in other["matches"]}

    [chosen] = upload(client, data, mode="same", **{"class": "bathroom"}).json()
    assert chosen["class_source"] == "given"
    assert [m["class"] for m in chosen["matches"]] == ["bathroom"] * 5


def test_upload_of_a_stored_photo_takes_its_class_and_leaves_it_out(client, library):
    _, _, photos = library
    stored = sorted((photos / "dining_room").glob("*.jpg"))[0]
    [item] = upload(client, stored.read_bytes(), "copy.jpg", mode="same").json()
    assert item["query_class"] == "dining_room" and item["class_source"] == "stored copy"
    assert str(stored.resolve()) not in [m["path"] for m in item["matches"]]
    assert len(item["matches"]) == PER_CLASS - 1


def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_answering(client):
    photo = unseen().read_bytes()
    cases = [
        (b"", "empty.jpg", "image/jpeg", 400, "empty.jpg: empty file (0 bytes)"),
        (b"shopping list: milk, eggs\n", "notes.txt", "text/plain", 415,
         "notes.txt: not an image (unknown or unsupported format)"),
        (huge_png(), "bomb.png", "image/png", 413, "bomb.png: too many pixels"),
        (photo[: len(photo) // 3], "cut.jpg", "image/jpeg", 400, "cut.jpg: "),
    ]
    for data, name, mime, status, message in cases:
        response = upload(client, data, name, mime)
        assert response.status_code == status, (name, response.text)
        detail = response.json()["detail"]
        assert detail.startswith(message) and "\n" not in detail
        assert client.get("/api/health").json()["status"] == "ok"
        again = upload(client, photo)
        assert again.status_code == 200 and len(again.json()[0]["matches"]) == 5


def test_uploads_over_the_size_limit_get_413(library):
    app, _, _ = library
    small = web_client(app, max_upload_bytes=1024 * 1024)
    just_over = upload(small, b"\xff" * (1024 * 1024 + 1), "big.jpg")
    assert just_over.status_code == 413
    assert just_over.json()["detail"] == "big.jpg: larger than the 1 MB upload limit"
    far_over = upload(small, b"\xff" * (5 * 1024 * 1024), "huge.jpg")
    assert far_over.status_code == 413 and "larger than the 1 MB limit" in far_over.json()["detail"]

    def chunked():  # no Content-Length: counted while the body arrives
        boundary = b"--imsearch-boundary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="stream.jpg"\r\n\r\n'
        for _ in range(5):
            yield b"\xff" * (1024 * 1024)
        yield b"\r\n" + boundary + b"--\r\n"

    streamed = small.post("/api/find", content=chunked(),
                          headers={"Content-Type": "multipart/form-data; boundary=imsearch-boundary"})
    assert streamed.status_code == 413 and "larger than the 1 MB limit" in streamed.json()["detail"]
    lying = small.post("/api/find", content=b"".join(chunked()),  # declares 200 bytes, sends 5 MB
                       headers={"Content-Type": "multipart/form-data; boundary=imsearch-boundary",
                                "Content-Length": "200"})
    assert lying.status_code == 413 and "larger than the 1 MB limit" in lying.json()["detail"]
    assert small.get("/api/health").status_code == 200


def test_uploads_leave_no_files_behind(client, tmp_path, monkeypatch):
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    noise = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert len(buf.getvalue()) > 2 * 1024 * 1024  # over Starlette's 1 MB in-memory spool
    before = sorted(Path.cwd().iterdir())
    response = upload(client, buf.getvalue(), "noise.png", "image/png")
    assert response.status_code == 200 and len(response.json()[0]["matches"]) == 5
    assert list(spool.iterdir()) == []
    assert sorted(Path.cwd().iterdir()) == before


def test_invalid_mode_k_and_class_are_one_line_errors(client):
    photo = unseen().read_bytes()
    bad_mode = upload(client, photo, mode="nearest")
    assert bad_mode.status_code == 422 and bad_mode.json()["detail"].startswith("mode: Input should be 'all'")
    bad_k = upload(client, photo, k=0)
    assert bad_k.status_code == 422 and bad_k.json()["detail"] == "k: Input should be greater than or equal to 1"
    no_file = client.post("/api/find", data={"mode": "all"})
    assert no_file.status_code == 422 and no_file.json()["detail"] == "file: Field required"
    unknown = upload(client, photo, mode="same", **{"class": "garage"})
    assert unknown.status_code == 400
    assert unknown.json()["detail"] == ("photo.jpg: class 'garage' is not stored (stored classes: bathroom, "
                                        "bedroom, dining_room, kitchen, living_room)")


def test_images_are_served_only_for_stored_rows_by_id(client, library):
    app, _, _ = library
    ids = [m["id"] for m in upload(client, unseen().read_bytes(), k=25).json()[0]["matches"]]
    assert len(ids) == 5 * PER_CLASS
    for image_id in ids[:3]:
        assert client.get(f"/images/{image_id}").content == Path(app.image(image_id)["path"]).read_bytes()
    missing = max(ids) + 1000
    assert client.get(f"/images/{missing}").json() == {"detail": f"no stored image has id {missing}"}
    assert client.get(f"/images/{missing}").status_code == 404
    for path in ("/images/0", "/images/-1", "/images/abc", "/images/%2Fetc%2Fpasswd", "/images/..%2F..%2Fetc%2Fpasswd",
                 "/images/1/../../etc/passwd", "/static/..%2F..%2Fapi.py", "/static/../app.py", "/etc/passwd",
                 "/images//etc/passwd"):
        response = client.get(path)
        assert response.status_code in (404, 422), path
        assert b"root:" not in response.content and b"import" not in response.content
    first = ids[0]
    assert client.get(f"/images/{first}", params={"path": "/etc/passwd"}).content == client.get(
        f"/images/{first}").content


def test_a_stored_row_whose_file_changed_or_vanished_is_not_served(app, tmp_path):
    photos = copy_photos(tmp_path / "few", 1)
    assert app.ingest(photos).added == 5
    client = web_client(app)
    [item] = upload(client, unseen().read_bytes()).json()
    changed, vanished, fifo = item["matches"][0], item["matches"][1], item["matches"][2]
    Path(changed["path"]).write_bytes(b"not what was stored")
    Path(vanished["path"]).unlink()
    Path(fifo["path"]).unlink()
    os.mkfifo(fifo["path"])  # nobody ever writes to it: reading it would hold a worker thread for good
    response = client.get(changed["image"])
    assert response.status_code == 404 and "changed since it was stored" in response.json()["detail"]
    assert client.get(changed["thumbnail"]).status_code == 404
    response = client.get(vanished["image"])
    assert response.status_code == 404 and "its file cannot be read" in response.json()["detail"]
    for url in (fifo["image"], fifo["thumbnail"]):
        response = client.get(url)
        assert response.status_code == 404 and "not a regular file" in response.json()["detail"]


def test_classes_and_health(client):
    assert client.get("/api/classes").json() == [
        {"class": c, "images": PER_CLASS} for c in ("bathroom", "bedroom", "dining_room", "kitchen", "living_room")
    ]
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == 5 * PER_CLASS
    assert health["model"].startswith("resnet50:file-")


def test_page_loads_nothing_from_elsewhere_and_the_schema_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert f'"{asset}"' in page.text
        assert client.get(asset).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/app.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    schema = client.get("/openapi.json").json()
    assert {"/api/find", "/api/classes", "/api/health", "/images/{image_id}",
            "/images/{image_id}/thumbnail"} <= set(schema["paths"])
    form = schema["components"]["schemas"][
        schema["paths"]["/api/find"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        .rsplit("/", 1)[-1]]
    assert {"file", "mode", "k", "class"} <= set(form["properties"])
    assert client.get("/docs").status_code == 404  # its scripts would come from a CDN


def test_a_request_naming_a_host_the_page_does_not_serve_gets_400(library, monkeypatch):
    app, _, _ = library
    page = web_client(app)
    photo = unseen().read_bytes()
    refused = page.post("/api/find", files={"file": ("photo.jpg", photo, "image/jpeg")},
                        headers={"Host": "evil.example"})
    assert refused.status_code == 400
    assert refused.json()["detail"] == ("this server does not answer to the host 'evil.example'; "
                                        "list it in IMSEARCH_ALLOWED_HOSTS to serve it under that name")
    for host in ("evil.example:8000", "localhost.evil.example", "127.0.0.1.evil.example", "", "[::1", "a b"):
        assert page.get("/api/health", headers={"Host": host}).status_code == 400, host
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert page.get("/api/health", headers={"Host": host}).status_code == 200, host

    named = web_client(app, allowed_hosts=["photos.example", "2001:db8::1"])
    [item] = named.post("/api/find", files={"file": ("photo.jpg", photo, "image/jpeg")},
                        headers={"Host": "photos.example:8000"}).json()
    assert item["matches"][0]["image"].startswith("http://photos.example:8000/images/")
    assert named.get("/api/health", headers={"Host": "[2001:db8:0::1]"}).status_code == 200
    assert named.get("/api/health", headers={"Host": "evil.example"}).status_code == 400

    monkeypatch.setenv("IMSEARCH_ALLOWED_HOSTS", "search.example, other.example")
    from_env = web_client(app)
    assert from_env.get("/api/health", headers={"Host": "other.example"}).status_code == 200
    assert from_env.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    assert web_client(app, allowed_hosts=["*"]).get("/api/health", headers={"Host": "evil.example"}).status_code == 200


def test_the_page_reconnects_after_the_database_drops_its_connection(stored, server_url):
    page = web_client(stored)
    photo = unseen().read_bytes()
    assert upload(page, photo).status_code == 200
    with psycopg.connect(server_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (stored.store.backend_pid,)).fetchone()[0]
    for _ in range(3):  # the first finds the connection closed before it uses it, and opens a new one
        again = upload(page, photo)
        assert again.status_code == 200 and len(again.json()[0]["matches"]) == 5
    assert page.get("/api/health").json()["images"] == 20


def test_statuses_follow_the_error_type_not_its_wording():
    from imsearch.errors import BadImage, DatabaseUnavailable, NotAnImage, TooManyPixels, UnknownClass
    from imsearch.web.app import status_of

    assert status_of(NotAnImage("a.jpg", "unreadable")) == 415
    assert status_of(TooManyPixels("a.png", "far too large")) == 413
    assert status_of(BadImage("a.jpg", "not an image, they say")) == 400
    assert status_of(BadImage("a.png", "too many pixels, they say")) == 400
    assert status_of(UnknownClass("no class")) == 400
    assert status_of(DatabaseUnavailable("down")) == 503


def test_a_nul_byte_in_the_class_is_a_400_saying_so(client):
    response = upload(client, unseen().read_bytes(), mode="same", **{"class": "kit\x00chen"})
    assert response.status_code == 400
    assert response.json()["detail"] == "photo.jpg: the class holds a NUL byte, which no class name can hold"
    assert upload(client, unseen().read_bytes(), mode="same", **{"class": "kitchen"}).status_code == 200


def test_every_get_route_answers_head_with_the_headers_of_its_get(client):
    image_id = upload(client, unseen().read_bytes()).json()[0]["matches"][0]["id"]
    for path in ("/", "/api/classes", "/api/health", f"/images/{image_id}", f"/images/{image_id}/thumbnail",
                 "/static/app.js", "/static/app.css", "/openapi.json"):
        got, head = client.get(path), client.head(path)
        assert got.status_code == head.status_code == 200, path
        assert head.content == b"", path
        for name in ("content-type", "content-length", "etag"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    assert client.head("/api/find").status_code == 405
    assert client.head("/images/999999999").status_code == 404


def test_json_static_and_error_answers_say_nosniff(client):
    for response in (client.get("/api/health"), client.get("/static/app.js"), client.get("/"),
                     client.get("/images/999999999"), client.get("/api/health", headers={"Host": "evil.example"}),
                     upload(client, b"", "empty.jpg"), client.head("/api/classes")):
        assert response.headers["x-content-type-options"] == "nosniff", response.request.url


def test_a_request_from_a_page_on_another_site_gets_403_unless_its_origin_is_allowed(library, monkeypatch):
    app, _, _ = library
    page = web_client(app)
    photo = unseen().read_bytes()

    def find(client, **headers):
        return client.post("/api/find", files={"file": ("photo.jpg", photo, "image/jpeg")}, headers=headers)

    refused = find(page, Origin="http://evil.example")
    assert refused.status_code == 403
    assert refused.json()["detail"] == (
        "refused: the request comes from a page on http://evil.example; another site's pages may not use this "
        "server unless it is listed with --allowed-origin or in IMSEARCH_ALLOWED_ORIGINS")
    for headers in ({"Origin": "http://localhost:8000"}, {"Origin": "null"}, {"Origin": "http://localhost.evil"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
                    {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}):
        response = find(page, **headers)
        assert response.status_code == 403 and "\n" not in response.json()["detail"], headers
    cors = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
    assert page.get("/api/health", headers=cors).status_code == 403
    # this page's own requests, a link followed from elsewhere, and clients that are no browser
    for headers in ({}, {"Origin": "http://localhost"}, {"Origin": "HTTP://LOCALHOST:80"},
                    {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                    {"Sec-Fetch-Site": "same-site"}):
        assert find(page, **headers).status_code == 200, headers
    assert page.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                                  "Sec-Fetch-Dest": "document"}).status_code == 200

    allowed = web_client(app, allowed_origins=["https://photos.example", "http://[::1]:3000"])
    assert find(allowed, Origin="https://photos.example", **{"Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert find(allowed, Origin="http://[::1]:3000").status_code == 200
    assert find(allowed, Origin="http://photos.example").status_code == 403
    monkeypatch.setenv("IMSEARCH_ALLOWED_ORIGINS", "https://a.example, https://b.example:8443")
    from_env = web_client(app)
    assert find(from_env, Origin="https://b.example:8443").status_code == 200
    assert find(from_env, Origin="https://c.example").status_code == 403
    assert find(web_client(app, allowed_origins=["*"]), Origin="https://c.example").status_code == 200
