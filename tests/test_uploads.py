"""What an upload may cost: accepted formats, the pixel cap, conversion in strips, decode slots, and a real server
under hostile uploads (bench/hostile.py), against a real database."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time

import anyio
import httpx
import numpy as np
import psutil
import pytest
from fastapi import HTTPException
from PIL import Image

from bench import hostile
from imsearch.errors import NotAnImage, TooCostly, TooManyPixels
from imsearch.files import IMAGE_SUFFIXES
from imsearch.model import pixels
from imsearch.web.app import DecodeSlots
from tests.conftest import ROOMS
from tests.test_web import upload, web_client

# The load test's bound: how far the server's RSS may rise above its RSS at rest while 8 clients send hostile
# uploads. Measured on 2 cores (bench/uploads.py, 10 s): 0.56-0.68 GB; 1.0-1.9 GB with Pillow's default 16 MB
# image blocks.
LOAD_SECONDS = 6
MAX_RSS_GROWTH = 1024**3


def photo() -> bytes:
    return sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0].read_bytes()


def saved(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def test_the_accepted_formats_are_those_of_the_accepted_file_names():
    assert {Image.registered_extensions()[suffix] for suffix in IMAGE_SUFFIXES} == set(pixels.FORMATS)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX", "DDS", "SGI", "QOI", "JPEG2000"])
def test_images_in_other_formats_are_not_opened(fmt):
    data = saved(Image.new("RGB", (64, 48), (200, 30, 40)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself reads it
    with pytest.raises(NotAnImage) as caught:
        pixels.load(data, "photo.jpg")
    assert caught.value.reason == "not an image (unknown or unsupported format)"


def test_postscript_named_jpg_is_not_an_image_and_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def refuse(*args, **kwargs):
        raise AssertionError("Ghostscript was asked to render an upload")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse)
    for read in (lambda d: pixels.load(d, "postscript.jpg"), lambda d: pixels.peek(d, "postscript.jpg")):
        with pytest.raises(NotAnImage):
            read(hostile.eps_named_jpg())


def test_an_upload_may_decode_at_most_40_million_pixels():
    cap = {"max_decode_pixels": pixels.UPLOAD_MAX_PIXELS, "prep": pixels.DEFAULT_PREPROCESS}
    bomb = hostile.one_bit_png(9990, 9990)
    assert pixels.peek(bomb, "bomb.png").decode_pixels == 9990 * 9990  # within what ingest takes
    with pytest.raises(TooManyPixels) as caught:
        pixels.peek(bomb, "bomb.png", **cap)
    assert caught.value.reason == ("too many pixels (9990x9990 > 40,000,000 to decode for an upload; "
                                   "decompression bomb?)")

    big = Image.new("RGB", (8000, 6000), (90, 120, 150))
    baseline = pixels.peek(saved(big, "JPEG"), "48mp.jpg", **cap)  # decoded at 1/8 scale
    assert (baseline.width, baseline.height, baseline.decode_pixels) == (8000, 6000, 1000 * 750)
    with pytest.raises(TooManyPixels) as caught:
        pixels.peek(saved(big, "JPEG", progressive=True), "48mp-progressive.jpg", **cap)
    assert "8000x6000 progressive or multi-scan JPEG > 40,000,000" in caught.value.reason

    assert pixels.peek(hostile.webp(4400, 4400), "19mp.webp", **cap).decode_pixels == 2 * 4400 * 4400
    with pytest.raises(TooManyPixels) as caught:
        pixels.load(hostile.webp(4500, 4500), "20mp.webp", max_decode_pixels=pixels.UPLOAD_MAX_PIXELS)
    assert "4500x4500 WebP, counted double > 40,000,000" in caught.value.reason


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA", "RGBa", "P"])
def test_conversion_in_strips_gives_the_pixels_of_a_whole_image_conversion(mode, monkeypatch):
    rng = np.random.default_rng(5)
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        img = Image.fromarray((rng.random((157, 311)) * 60000).astype(dtype))
    else:
        img = Image.fromarray(rng.integers(0, 256, (157, 311, 4), dtype=np.uint8), "RGBA")
        if mode == "P":
            img = img.convert("RGB").quantize(200)
            img.info["transparency"] = 7
        else:
            img = img.convert(mode)
    assert img.mode == mode
    whole = np.asarray(pixels.to_rgb(img))
    monkeypatch.setattr(pixels, "STRIP_PIXELS", 997)  # 3 rows a strip
    strips = np.asarray(pixels.to_rgb(img))
    assert strips.shape == (157, 311, 3) and np.array_equal(strips, whole)


def test_decode_slots_turn_a_second_heavy_decode_away_at_once_and_let_light_ones_wait():
    async def main() -> None:
        slots = DecodeSlots(2, wait=0.3)
        async with slots.hold(heavy=True):
            started = time.monotonic()
            with pytest.raises(HTTPException) as caught:
                async with slots.hold(heavy=True):
                    pass
            assert time.monotonic() - started < 0.1
            assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "2"}
            async with slots.hold(heavy=False):  # the other slot
                started = time.monotonic()
                with pytest.raises(HTTPException) as caught:
                    async with slots.hold(heavy=False):
                        pass
                assert 0.25 < time.monotonic() - started < 1 and caught.value.status_code == 503

    anyio.run(main)


def test_a_heavy_decode_does_not_go_before_a_light_one_that_waits():
    async def main() -> None:
        slots = DecodeSlots(2, wait=5)
        started: list[str] = []

        async def light(name: str, seconds: float) -> None:
            async with slots.hold(heavy=False):
                started.append(name)
                await anyio.sleep(seconds)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(light, "first", 0.3)
            tasks.start_soon(light, "second", 0.3)
            await anyio.sleep(0.05)
            tasks.start_soon(light, "waiting", 0)
            await anyio.sleep(0.05)
            with pytest.raises(HTTPException):
                async with slots.hold(heavy=True):
                    started.append("heavy")
        assert started == ["first", "second", "waiting"]

    anyio.run(main)


def test_each_hostile_upload_alone_gets_its_status(stored):
    page = web_client(stored)
    for item in hostile.uploads():
        response = upload(page, item.data, item.name, item.mime)
        assert response.status_code in item.expect - {503}, (item.name, response.text)
        if response.status_code != 200:
            assert response.json()["detail"].startswith(f"{item.name}: ")
    assert upload(page, photo()).status_code == 200


def test_a_server_under_hostile_uploads_stays_within_its_memory_and_keeps_searching(stored, database_url, weights,
                                                                                   tmp_path):
    uploads = hostile.uploads()
    with hostile.serving(database_url, weights, tmp_path / "serve.log") as (base, server):
        pid = server.pid
        hostile.quiet_searches(base, photo(), seconds=1)  # the model warmed up: its memory is at rest
        load = hostile.pound(base, pid, uploads, photo(), seconds=LOAD_SECONDS, clients=8,
                            min_searches=3)

    statuses = [status for status, _ in load.normal]
    assert len(statuses) >= 3 and set(statuses) == {200}, load.normal
    expected = {item.name: item.expect for item in uploads}
    for name, status, retry_after, detail in load.hostile:
        assert status in expected[name], (name, status, detail)
        if status == 503:
            assert retry_after == "2" and detail.startswith("the server is busy decoding"), detail
    assert {name for name, *_ in load.hostile} == set(expected)
    assert load.peak_rss - load.idle_rss < MAX_RSS_GROWTH, (
        f"RSS rose from {load.idle_rss / 2**20:.0f} MB to {load.peak_rss / 2**20:.0f} MB")


# -- uploads whose cost is not their size -------------------------------------------------------------------------


def test_a_jpeg_with_thousands_of_scans_is_refused_from_its_markers_before_decoding():
    scans = hostile.many_scans_jpeg()  # 4000x2900, 3,010 scans: 30 s of one core to decode
    for read in (lambda: pixels.peek(scans, "scans.jpg"), lambda: pixels.load(scans, "scans.jpg")):
        started = time.process_time()
        with pytest.raises(TooCostly) as caught:
            read()
        assert time.process_time() - started < 1
        assert caught.value.reason == ("too many scans to decode (3,010 scans of 4000x2900; at most 100 scans and "
                                       "2,000,000,000 scans x pixels)")
    assert caught.value.path == "scans.jpg" and isinstance(caught.value, TooManyPixels)  # 413 on the page


def test_scans_are_bounded_by_scans_times_pixels_and_what_follows_the_image_is_not_counted():
    progressive = hostile.progressive_jpeg(4000, 2900)
    after_first = progressive.index(b"\xff\xda") + 2
    assert pixels.count_scans(io.BytesIO(progressive), after_first) == 10  # libjpeg's script, as Pillow saves
    assert pixels.peek(hostile.repeat_last_scan(progressive, 90), "100-scans.jpg").width == 4000
    with pytest.raises(TooCostly):
        pixels.peek(hostile.repeat_last_scan(progressive, 91), "101-scans.jpg")
    # 100 MP in 21 scans: under the scan cap, over 2,000,000,000 scans x pixels (peeked only, never decoded)
    with pytest.raises(TooCostly) as caught:
        pixels.peek(hostile.repeat_last_scan(hostile.progressive_jpeg(10_000, 10_000), 11), "100mp.jpg")
    assert "21 scans of 10000x10000" in caught.value.reason
    # a phone's motion photo: a video after the end of the image, whose bytes hold start-of-scan pairs
    trailer = progressive + b"\xff\xda" * 5000
    assert pixels.peek(trailer, "motion.jpg").width == 4000


@pytest.mark.parametrize("layout", [{}, {"big_endian": True}, {"bigtiff": True}, {"bigtiff": True, "big_endian": True}],
                         ids=["II", "MM", "BigTIFF-II", "BigTIFF-MM"])
def test_a_tiff_with_millions_of_strips_is_refused_before_pillow_reads_its_offsets(layout):
    strips = hostile.many_strip_tiff(3_000_000, **layout)  # 18 MB; Pillow took 7 s and 1 GB to open it
    started = time.process_time()
    with pytest.raises(TooCostly) as caught:
        pixels.peek(strips, "strips.tif")
    assert time.process_time() - started < 0.5
    assert caught.value.reason == ("too many TIFF strips to read (3,000,000 > 65,536; "
                                   "no camera or scanner writes so many)")


def test_a_tiff_at_the_strip_cap_still_opens_and_decodes():
    fits = hostile.many_strip_tiff(pixels.MAX_TIFF_CHUNKS)
    started = time.process_time()
    loaded = pixels.load(fits, "65536-strips.tif")
    assert time.process_time() - started < 5 and (loaded.width, loaded.height) == (1, pixels.MAX_TIFF_CHUNKS)
    assert pixels.peek(hostile.many_strip_tiff(1000, bigtiff=True), "bigtiff.tif").height == 1000


def test_a_tiff_with_too_many_entries_in_its_ifd_is_refused():
    entries = pixels.MAX_TIFF_ENTRIES + 1
    data = b"II*\x00" + struct.pack("<IH", 8, entries) + struct.pack("<HHII", 65000, 1, 1, 0) * entries + bytes(4)
    with pytest.raises(TooCostly) as caught:
        pixels.peek(data, "entries.tif")
    assert caught.value.reason == "too many TIFF entries to read (4,097 in one IFD > 4,096)"


def send_all(base: str, sends: list[tuple[str, bytes, str]]) -> list[tuple[str, int, float, str]]:
    """Each upload from its own thread, all at once: (name, status, seconds, detail)."""
    out: list[tuple[str, int, float, str]] = []

    def send(name: str, data: bytes, mime: str) -> None:
        with httpx.Client(timeout=120) as client:
            started = time.monotonic()
            response = hostile.post(client, base, name, data, mime)
            detail = response.json().get("detail", "") if response.status_code != 200 else ""
            out.append((name, response.status_code, time.monotonic() - started, detail))

    threads = [threading.Thread(target=send, args=item) for item in sends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_uploads_dear_to_open_get_413_within_seconds_while_normal_searches_keep_answering(
        stored, database_url, weights, tmp_path):
    jpeg, tiff = hostile.many_scans_jpeg(), hostile.many_strip_tiff(3_000_000)
    costly = [(f"scans-{i}.jpg", jpeg, "image/jpeg") for i in range(2)]
    costly += [(f"strips-{i}.tif", tiff, "image/tiff") for i in range(2)]
    with hostile.serving(database_url, weights, tmp_path / "serve.log") as (base, _):
        hostile.quiet_searches(base, photo(), seconds=1)
        normal = [("photo.jpg", photo(), "image/jpeg")] * 3
        answers = send_all(base, costly + normal)
    for name, status, seconds, detail in answers:
        if name == "photo.jpg":
            assert status == 200 and seconds < 10, (status, seconds)
        else:
            assert status == 413 and seconds < 5, (name, status, seconds, detail)
            assert detail.startswith(f"{name}: too many {'scans' if name.endswith('.jpg') else 'TIFF strips'}")
    assert len(answers) == 7


def decoders(pid: int) -> list[psutil.Process]:
    """The server's decoder processes (multiprocessing's spawned children, not its resource tracker)."""
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
    return out


def raw_upload(base: str, name: str, data: bytes) -> socket.socket:
    """A multipart upload sent whole through a plain socket, left open for its answer."""
    boundary = "imsearch-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    host, port = base.removeprefix("http://").split(":")
    head = (f"POST /api/find HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + body)
    return sock


def test_a_decode_stops_when_its_client_goes_away(stored, database_url, weights, tmp_path):
    slow = hostile.many_scans_jpeg(6300, 6300, 40)  # 50 scans of 39.7 MP: accepted, about 2 s of one core
    with hostile.serving(database_url, weights, tmp_path / "serve.log") as (base, server):
        pid = server.pid
        hostile.quiet_searches(base, photo(), seconds=1)  # a decoder process is started and idle
        idle = {p.pid: p.cpu_times().user for p in decoders(pid)}
        assert idle, "no decoder process: uploads are decoded in the server's own threads"
        sock = raw_upload(base, "slow.jpg", slow)
        busy = None
        deadline = time.monotonic() + 20
        while busy is None and time.monotonic() < deadline:
            busy = next((p for p in decoders(pid) if p.cpu_times().user > idle.get(p.pid, 0) + 0.3), None)
            time.sleep(0.02)
        assert busy is not None, "the upload was never decoded"
        sock.close()
        gone = time.monotonic()
        with contextlib.suppress(psutil.NoSuchProcess):
            busy.wait(timeout=10)
        assert time.monotonic() - gone < 1, "the decode went on after its client went away"
        with httpx.Client(timeout=60) as client:
            assert hostile.post(client, base, "photo.jpg", photo(), "image/jpeg").status_code == 200
