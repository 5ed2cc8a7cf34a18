"""Hostile uploads for the web page (small files that decode large, bodies at the size limit, formats it refuses),
and a real `imsearch serve` to send them to while its memory is sampled.

For bench/uploads.py, which imports it as `hostile` (the scripts run as `.venv/bin/python bench/NAME.py`), and
tests/test_uploads.py, which asserts on the same load. Every file is made here, in memory.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image


@dataclass(frozen=True)
class Upload:
    """One file to send to /api/find, and the statuses the page may answer it with."""

    name: str
    data: bytes
    mime: str
    expect: frozenset[int]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_bit_png(width: int, height: int) -> bytes:
    """An all-black 1-bit PNG: 9990x9990 is 99.8 M pixels in 24 kB."""
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rgba_png(width: int, height: int) -> bytes:
    """A transparent 8-bit RGBA PNG of one colour: the costliest PNG to turn into RGB, in a few hundred kB."""
    row = b"\x00" + b"\x10\x20\x30\x80" * width
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def deflated_tiff(width: int, height: int, bits: int, samples: int) -> bytes:
    """A one-strip, deflate-compressed TIFF of zeros (`samples` of `bits` each; 3 = RGB, 4 = RGBA, 1 = grey):
    libtiff holds the whole strip next to Pillow's image."""
    packer = zlib.compressobj(9)
    row = bytes(width * samples * bits // 8)
    strip = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    tags: list[tuple[int, int, int, bytes | int]] = [  # (tag, type, count, value): type 3 SHORT, 4 LONG
        (256, 4, 1, width), (257, 4, 1, height),
        (258, 3, samples, struct.pack("<" + "H" * samples, *[bits] * samples) if samples > 2 else bits),
        (259, 3, 1, 8), (262, 3, 1, 2 if samples >= 3 else 1), (273, 4, 1, 0), (277, 3, 1, samples),
        (278, 4, 1, height), (279, 4, 1, len(strip)), (284, 3, 1, 1),
    ]
    if samples == 4:
        tags.append((338, 3, 1, 2))  # unassociated alpha
    if bits == 32:
        tags.append((339, 3, 1, 3))  # floating point samples
    ifd_at = 8
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    strip_at = extra_at + 16
    entries, extra = b"", b""
    for tag, kind, count, value in tags:
        if tag == 273:
            value = strip_at
        if isinstance(value, bytes):
            entries += struct.pack("<HHII", tag, kind, count, extra_at + len(extra))
            extra += value
        elif kind == 3:
            entries += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            entries += struct.pack("<HHII", tag, kind, count, value)
    extra = extra.ljust(16, b"\x00")
    return b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(tags)) + entries + b"\x00" * 4 + extra + strip


def webp(width: int, height: int) -> bytes:
    """A lossless one-colour RGBA WebP: libwebp and Pillow each hold its frame."""
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (16, 32, 48, 128)).save(out, "WEBP", lossless=True, quality=0, method=0)
    return out.getvalue()


def progressive_jpeg(width: int, height: int) -> bytes:
    """A one-colour 4:4:4 progressive JPEG: libjpeg keeps every coefficient whatever the draft scale."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(out, "JPEG", progressive=True, subsampling=0, quality=90)
    return out.getvalue()


def repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG with its last scan (start-of-scan segment and coded data, up to end-of-image) there
    `times` more times: libjpeg decodes every copy, each over the whole image."""
    end = jpeg.rindex(b"\xff\xd9")
    last = jpeg.rindex(b"\xff\xda", 0, end)
    return jpeg[:end] + jpeg[last:end] * times + jpeg[end:]


def many_scans_jpeg(width: int = 4000, height: int = 2900, times: int = 3000) -> bytes:
    """A one-colour progressive JPEG as Pillow saves it, its last scan repeated: 4000x2900 and 3,000 more scans
    are 280 kB and took 30 s of one core to decode."""
    return repeat_last_scan(progressive_jpeg(width, height), times)


def many_strip_tiff(height: int, *, big_endian: bool = False, bigtiff: bool = False) -> bytes:
    """An uncompressed 8-bit grey TIFF of 1 x `height` pixels in one-row strips, every strip the same byte: 1 x
    3,000,000 is 18 MB of strip offsets and counts, which Pillow read whole while opening (7 s, 1 GB)."""
    order = ">" if big_endian else "<"
    offset, word = ("Q", 8) if bigtiff else ("I", 4)
    entry = "HHQQ" if bigtiff else "HHII"
    tags = [(256, 4, 1), (257, 4, 1), (258, 3, 1), (259, 3, 1), (262, 3, 1), (273, 4, height), (277, 3, 1),
            (278, 4, 1), (279, 3, height)]
    head = 16 if bigtiff else 8
    table = (8 if bigtiff else 2) + len(tags) * (20 if bigtiff else 12) + word
    pixel_at = head + table
    offsets_at = pixel_at + 1
    counts_at = offsets_at + 4 * height
    values = {256: 1, 257: height, 258: 8, 259: 1, 262: 1, 273: offsets_at, 277: 1, 278: 1, 279: counts_at}
    if bigtiff:
        out = (b"MM\x00+" if big_endian else b"II+\x00") + struct.pack(order + "HHQ", 8, 0, head)
        out += struct.pack(order + "Q", len(tags))
    else:
        out = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(order + "I", head)
        out += struct.pack(order + "H", len(tags))
    for tag, kind, count in tags:
        value = values[tag]
        if count == 1:  # a value sits at the start of the value field, in the file's byte order
            field = struct.pack(order + ("H" if kind == 3 else "I"), value).ljust(word, b"\x00")
            out += struct.pack(order + entry[:3], tag, kind, count) + field
        else:
            out += struct.pack(order + entry, tag, kind, count, value)
    out += bytes(word) + b"\x80"
    return out + struct.pack(order + "I", pixel_at) * height + struct.pack(order + "H", 1) * height


def noise_png(size_bytes: int) -> bytes:
    """A PNG of random pixels about `size_bytes` long: a large body that is a real, modest image."""
    side = int((size_bytes * 0.99 / 3) ** 0.5)
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=0)
    return out.getvalue()


def eps_named_jpg() -> bytes:
    """An Encapsulated PostScript file: Pillow with every plugin would hand it to Ghostscript."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9990 9990\n"
            b"newpath 0 0 moveto 9990 9990 lineto stroke showpage\n%%EOF\n")


def uploads(max_upload_bytes: int = 20 * 1024 * 1024, names: Iterable[str] | None = None) -> list[Upload]:
    """The hostile set (or the named ones): each refused at once (413, 415), or decoded in one of the page's few
    decode slots (200), or turned away while those are taken (503)."""
    big = max_upload_bytes - 64 * 1024
    makers: dict[str, tuple[Callable[[], bytes], str, set[int]]] = {
        "bomb-9990.png": (lambda: one_bit_png(9990, 9990), "image/png", {413}),
        "rgba-39mp.png": (lambda: rgba_png(6300, 6300), "image/png", {200, 503}),
        "rgba16-39mp.tif": (lambda: deflated_tiff(6300, 6300, 16, 4), "image/tiff", {200, 503}),
        "float-39mp.tif": (lambda: deflated_tiff(6300, 6300, 32, 1), "image/tiff", {200, 503}),
        "rgba-19mp.webp": (lambda: webp(4400, 4400), "image/webp", {200, 503}),
        "progressive-100mp.jpg": (lambda: progressive_jpeg(9990, 9990), "image/jpeg", {413}),
        "noise-near-limit.png": (lambda: noise_png(big), "image/png", {200, 503}),
        "random-near-limit.jpg": (lambda: np.random.default_rng(3).bytes(big), "image/jpeg", {415}),
        "postscript.jpg": (eps_named_jpg, "image/jpeg", {415}),
        "scans-3000.jpg": (many_scans_jpeg, "image/jpeg", {413}),
        "strips-3m.tif": (lambda: many_strip_tiff(3_000_000), "image/tiff", {413}),
    }
    chosen = list(makers) if names is None else list(names)
    return [Upload(name, makers[name][0](), makers[name][1], frozenset(makers[name][2])) for name in chosen]


# -- a real server under load ------------------------------------------------------------------------------------

SHARED = Path(os.environ.get("IMSEARCH_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"


def stored_library(work: Path, url: str, per_class: int) -> tuple[str, int]:
    """The weights (IMSEARCH_WEIGHTS, else the stand-in checkpoint written into `work`) and the first `per_class`
    photos of each class of ../shared's rooms stored in the database at `url`: the weights and how many were added."""
    from imsearch import Imsearch

    weights = os.environ.get("IMSEARCH_WEIGHTS") or str(work / "standin.pth")
    if not os.environ.get("IMSEARCH_WEIGHTS"):
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), weights], check=True,
                       capture_output=True)
    photos = work / "photos"
    for folder in sorted((ROOMS / "base").iterdir()):
        (photos / folder.name).mkdir(parents=True)
        for src in sorted(folder.glob("*.jpg"))[:per_class]:
            (photos / folder.name / src.name).write_bytes(src.read_bytes())
    with Imsearch(url, weights=weights, device="cpu") as app:
        return weights, app.ingest(photos).added


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(database_url: str | None, weights: str, log: Path, *, args: Sequence[str] = (),
            open_files: int | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`imsearch serve ARGS` on a free loopback port in a process of its own, its output in `log`, with soft and
    hard open-file limits of `open_files` when given: its base URL and process. No database URL: the embedded
    server under the IMSEARCH_HOME of `env`."""
    port = free_port()

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    url = ["--database-url", database_url] if database_url else []
    with open(log, "w+b") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from imsearch.cli import main; main()", *url, "serve", "--host", "127.0.0.1",
             "--port", str(port), "--weights", weights, "--device", "cpu", *args],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit, env=env, start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    out.seek(0)
                    raise RuntimeError(f"imsearch serve exited with {proc.returncode}: {out.read().decode()[-2000:]}")
                try:
                    if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"imsearch serve did not answer within {timeout:.0f} s")
                time.sleep(0.2)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss(process: psutil.Process) -> int:
    """Resident bytes of a process and its children."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


@dataclass
class Load:
    """What a server did under hostile uploads: its memory, and what each client got back."""

    seconds: float
    idle_rss: int
    peak_rss: int
    normal: list[tuple[int, float]] = field(default_factory=list)  # status, seconds
    hostile: list[tuple[str, int, str | None, str]] = field(default_factory=list)  # name, status, Retry-After, detail

    def normal_p50(self) -> float:
        return statistics.median(s for _, s in self.normal) if self.normal else math.nan

    def counts(self) -> dict[str, dict[int, int]]:
        out: dict[str, dict[int, int]] = {}
        for name, status, _, _ in self.hostile:
            out.setdefault(name, {}).setdefault(status, 0)
            out[name][status] += 1
        return out


def post(client: httpx.Client, base: str, name: str, data: bytes, mime: str) -> httpx.Response:
    return client.post(base + "/api/find", files={"file": (name, data, mime)}, data={"mode": "all", "k": "5"})


def pound(base: str, pid: int, hostile: list[Upload], normal: bytes, *, seconds: float, clients: int = 8,
          sample_every: float = 0.05, min_searches: int = 0, max_seconds: float = 120) -> Load:
    """For `seconds`, `clients` threads send the hostile uploads (client i the i-th, the i+clients-th, ... in turn,
    each upload as soon as the last is answered) while one more searches with a normal photo, one search after
    another; the server's RSS is sampled every `sample_every` seconds.

    The pounding goes on past `seconds` until `min_searches` normal searches and every hostile upload are answered
    (or `max_seconds`), so a slow machine is judged on as much as a fast one: a client whose first upload takes the
    whole `seconds` still sends its second."""
    process = psutil.Process(pid)
    load = Load(seconds, rss(process), rss(process))
    stop = threading.Event()
    lock = threading.Lock()

    def sample() -> None:
        while not stop.is_set():
            load.peak_rss = max(load.peak_rss, rss(process))
            time.sleep(sample_every)

    def attack(offset: int) -> None:
        mine = hostile[offset::clients] or hostile
        with httpx.Client(timeout=120) as client:
            i = 0
            while not stop.is_set():
                upload = mine[i % len(mine)]
                response = post(client, base, upload.name, upload.data, upload.mime)
                detail = response.json().get("detail", "") if response.status_code != 200 else ""
                with lock:
                    load.hostile.append((upload.name, response.status_code, response.headers.get("retry-after"),
                                         detail))
                i += 1

    def search() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                started = time.perf_counter()
                response = post(client, base, "photo.jpg", normal, "image/jpeg")
                load.normal.append((response.status_code, time.perf_counter() - started))

    threads = [threading.Thread(target=sample)] + [threading.Thread(target=attack, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=search))
    for t in threads:
        t.start()
    started = time.monotonic()
    time.sleep(seconds)
    names = {upload.name for upload in hostile}

    def answered() -> bool:
        with lock:
            return len(load.normal) >= min_searches and names <= {name for name, *_ in load.hostile}

    while not answered() and time.monotonic() - started < max_seconds:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    load.peak_rss = max(load.peak_rss, rss(process))
    return load


def quiet_searches(base: str, normal: bytes, *, seconds: float) -> list[float]:
    """Seconds per normal search with nothing else going on."""
    out = []
    with httpx.Client(timeout=60) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            post(client, base, "photo.jpg", normal, "image/jpeg").raise_for_status()
            out.append(time.perf_counter() - started)
    return out
