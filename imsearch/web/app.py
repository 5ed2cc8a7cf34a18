"""The search page and its JSON API: a thin layer over `Imsearch`, as the CLI is.

One `Imsearch` (one model, one database connection) is built before the app and shared by every request;
decoding, the model and the database run in worker threads, off the event loop. Uploads stay in memory
(Starlette spools a part over 1 MB to an unnamed temporary file that goes with the request); nothing else is
written. Images are served only for stored rows, by id, and only while the file holds the bytes that were stored.

What an upload may cost is settled before it is decoded: its size by `guards.UploadLimit`, its format and pixels by its
header (`pixels.peek`, read in slots of its own), and how many decodes run at once by `DecodeSlots`; each
decode runs in a child process (`decoding.Decoders`) that is killed if its client goes away. The guards
(`guards`) answer only requests that name this server and come from no other site's page.
"""

import io
import logging
import os
import re
import string
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ..api import Embedded, Imsearch
from ..audit.calibration import DUPLICATE
from ..db.errors import translated
from ..errors import (
    BadImage,
    DatabaseUnavailable,
    ImsearchError,
    ModelMismatch,
    NotAnImage,
    SchemaOutdated,
    TooManyPixels,
    WeightsUnavailable,
)
from ..files import sha256_bytes
from ..model import pixels
from ..modes import Mode
from ..workers import default_workers
from .decoding import ClientGone, Decoders, load_upload, make_thumbnail
from .guards import (
    HeadAsGet,
    NoSniff,
    SameSite,
    TrustedHosts,
    UploadLimit,
    allowed_hosts_from_env,
    allowed_origins_from_env,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 100  # the page's own cap, below the library's (imsearch.modes.MAX_K): an upload is anyone's request
# Multipart boundaries, part headers and the small form fields around the file.
FORM_OVERHEAD_BYTES = 64 * 1024
THUMBNAIL_SIZE = 320
# A JPEG is decoded at the smallest DCT scale whose short side is at least twice THUMBNAIL_SIZE / 2.
THUMBNAIL_DRAFT = pixels.Preprocess("thumbnail", THUMBNAIL_SIZE // 2, None)
THUMBNAIL_CACHE_ITEMS = 2048
# A decode whose header says it holds more pixels than this is heavy (pixels.peek; a phone JPEG of any size is
# light, decoded at its draft scale, and so is a 12 MP PNG): one at a time, and it never waits for its turn.
LIGHT_PIXELS = 12_000_000
# How long a light decode waits for a slot before its request gets 503, and the Retry-After that comes with it.
DECODE_WAIT_SECONDS = 5.0
RETRY_AFTER_SECONDS = 2
# Pillow allocates a large image in blocks of this size. Its default, 16 MB, falls under glibc's mmap threshold
# once that has risen (it follows the largest block freed, up to 32 MB), and then freed blocks stay in the heaps of
# the worker threads: under bench/uploads.py the server grew by 1.0-1.9 GB with it and by 0.56-0.68 GB with 64 MB
# blocks, which glibc maps and unmaps one by one. A smaller image is one allocation either way.
IMAGE_BLOCK_BYTES = 64 * 1024 * 1024
# What a database failure answers: its detail (a socket path, a URL) goes to the server's log only.
DATABASE_DOWN = "the database is not answering; try again in a moment"
URL_IN_TEXT = re.compile(r"postgres(?:ql)?://\S*?(?=:\s|\s|$)")

# Everything the page loads comes from this server (the query preview is a blob: URL of the chosen file).
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MB"


def map_image_blocks() -> None:
    """Give Pillow IMAGE_BLOCK_BYTES blocks, unless PILLOW_BLOCK_SIZE (Pillow's own setting) says otherwise."""
    if "PILLOW_BLOCK_SIZE" not in os.environ:
        Image.core.set_block_size(IMAGE_BLOCK_BYTES)


def status_of(exc: ImsearchError) -> int:
    """The HTTP status for a library error, by its type: the client's fault is 4xx, the server's set-up 503."""
    if isinstance(exc, NotAnImage):
        return 415
    if isinstance(exc, TooManyPixels):
        return 413
    if isinstance(exc, (DatabaseUnavailable, SchemaOutdated, ModelMismatch, WeightsUnavailable)):
        return 503
    return 400  # BadImage, UnknownClass, a bad argument


def upload_name(filename: str | None) -> str:
    """The uploaded file's base name, printable and short: it only ever appears in messages and JSON."""
    name = re.split(r"[/\\]", filename or "")[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()[:120]
    return name or "upload"


class DecodeSlots:
    """At most `slots` decodes (each with its embedding) at once, of which one may be heavy (over LIGHT_PIXELS).

    A heavy decode starts at once or is turned away: heavy uploads are what an attacker sends, and a queue of them
    would hold their memory and hold up every other search. A light one waits up to `wait` seconds for a slot.
    Turned away means 503 with Retry-After. Waiting happens on the event loop, not in a worker thread.
    """

    def __init__(self, slots: int, wait: float = DECODE_WAIT_SECONDS) -> None:
        self.slots = slots
        self.wait = wait
        self._any = anyio.Semaphore(slots)
        self._heavy = anyio.Semaphore(1)
        self._headers = anyio.Semaphore(slots)

    async def read_header(self, read: Callable[..., T], *args: Any, **options: Any) -> T:
        """`read(*args, **options)` in a worker thread, at most `slots` at once, waiting as a light decode does.

        Header reads have slots of their own, as many: each is bounded (pixels' caps on TIFF strips and IFD
        entries, JPEG scans read in blocks), and a queue of uploads turned away by their header never holds up a
        decode that passed its own.
        """
        taken = False
        with anyio.move_on_after(self.wait):
            await self._headers.acquire()
            taken = True
        if not taken:
            raise busy("other images")
        try:
            return await run_in_threadpool(read, *args, **options)
        finally:
            self._headers.release()

    @asynccontextmanager
    async def hold(self, heavy: bool) -> AsyncIterator[None]:
        if heavy:
            try:
                self._heavy.acquire_nowait()
            except anyio.WouldBlock:
                raise busy("another large image") from None
            try:
                self._any.acquire_nowait()  # refused while light decodes wait: they came first
            except anyio.WouldBlock:
                self._heavy.release()
                raise busy("other images") from None
        else:
            taken = False
            with anyio.move_on_after(self.wait):
                await self._any.acquire()
                taken = True
            if not taken:
                raise busy("other images")
        try:
            yield
        finally:
            self._any.release()
            if heavy:
                self._heavy.release()


def busy(what: str) -> HTTPException:
    return HTTPException(503, f"the server is busy decoding {what}; try again in a moment",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def public_detail(text: str) -> str:
    """A message for the page's answers: database URLs (which may hold a socket's path) become "the database"."""
    return URL_IN_TEXT.sub("the database", text)


class Thumbnails:
    """Small JPEGs of stored images, kept in memory by (id, sha256): a changed file gets a new entry."""

    def __init__(self, max_items: int = THUMBNAIL_CACHE_ITEMS) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[int, str], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


def media_type(data: bytes) -> str:
    """The image's MIME type from its own bytes (not from a file name)."""
    try:
        fmt = Image.open(io.BytesIO(data), formats=pixels.FORMATS).format
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"
    return Image.MIME.get(fmt or "", "application/octet-stream")


def stored_file(imsearch: Imsearch, image_id: int) -> tuple[dict[str, Any], bytes]:
    """A stored row and its file's bytes; 404 unless the row exists and its file still has the stored bytes."""
    row = imsearch.image(image_id)
    if row is None:
        raise HTTPException(404, f"no stored image has id {image_id}")
    try:
        data = pixels.read_file(Path(row["path"]))
    except BadImage as exc:
        raise HTTPException(404, f"image {image_id} is stored, but its file cannot be read ({exc.reason}); "
                                 "run `imsearch ingest --prune` on its folder") from None
    if sha256_bytes(data) != row["sha256"]:
        raise HTTPException(404, f"image {image_id}: its file changed since it was stored; "
                                 "run `imsearch ingest` on its folder again")
    return row, data


def answering(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with its driver errors turned into library errors: a value the database refused is the
    request's fault (400), any other failure the database's (503; the detail goes to the log)."""
    with translated("answering from"):
        return fn(*args)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`answering(fn, *args)` in a worker thread, off the event loop."""
    return await run_in_threadpool(answering, fn, *args)


async def disconnected(request: Request) -> None:
    """Returns once the request's client has closed its connection (the body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def search_upload(
    imsearch: Imsearch, loaded: pixels.Loaded, data: bytes, name: str, mode: str, k: int, given: str | None,
    max_distance: float | None = None, decode_seconds: float = 0.0,
) -> dict[str, Any]:
    """Embed one decoded upload and rank the stored images, as `imsearch find --json` does for one file.

    The class modes need the query's class: as given, else a stored copy's, else the class of the top match
    over all images (the page says which, and lets a person pick another).
    """
    started = time.perf_counter() - decode_seconds
    [vector] = imsearch.embedder.embed(loaded.pixels[None])
    query = Embedded(name, vector, sha256_bytes(data), None)
    embedded = time.perf_counter()
    result = imsearch.search(query, mode, k=k, query_class=given, class_from_top_match=True,
                             max_distance=max_distance)
    done = time.perf_counter()
    item = result.to_json()
    item["class_source"] = result.class_source
    item["seconds"] = {"total": round(done - started, 4), "embed": round(embedded - started, 4),
                       "search": round(done - embedded, 4)}
    return item


def create_app(
    imsearch: Imsearch,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    decode_slots: int | None = None,
    allowed_origins: Sequence[str] | None = None,
) -> FastAPI:
    """The ASGI app over one shared `Imsearch`. Connects and loads the model now, so errors come before serving.

    `allowed_hosts`: names the page answers to besides loopback and the address a request came in on (None: those
    in IMSEARCH_ALLOWED_HOSTS; "*": any). `decode_slots`: decodes at once (None: from the CPU count).
    `allowed_origins`: sites whose pages may send requests here (None: those in IMSEARCH_ALLOWED_ORIGINS; "*": any).
    """
    with translated("answering from"):
        imsearch.count()  # the database first: a wrong URL fails before the model loads
    identity = imsearch.embedder.identity
    map_image_blocks()
    too_large = f"the upload is larger than the {megabytes(max_upload_bytes)} limit"
    thumbnails = Thumbnails()
    slots = DecodeSlots(decode_slots or default_workers())
    decoders = Decoders(None if "PILLOW_BLOCK_SIZE" in os.environ else IMAGE_BLOCK_BYTES)
    hosts = allowed_hosts_from_env() if allowed_hosts is None else list(allowed_hosts)
    origins = allowed_origins_from_env() if allowed_origins is None else list(allowed_origins)
    page = string.Template((STATIC / "index.html").read_text(encoding="utf-8")).substitute(
        max_upload_bytes=max_upload_bytes, max_upload=megabytes(max_upload_bytes), max_k=MAX_K, model=identity,
        duplicate=DUPLICATE,
    )

    app = FastAPI(
        title="imsearch",
        summary="Content-based image search on PostgreSQL + pgvector (ResNet-50 features, cosine distance).",
        version="1",
        docs_url=None,  # the interactive docs load their scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES, message=too_large)
    app.add_middleware(SameSite, origins=origins)
    app.add_middleware(TrustedHosts, hosts=hosts)
    app.add_middleware(HeadAsGet)
    app.add_middleware(NoSniff)  # added last, so it runs first: every answer carries it
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ImsearchError)
    async def library_error(request: Request, exc: ImsearchError) -> JSONResponse:
        if isinstance(exc, DatabaseUnavailable):
            return database_down(request, str(exc))
        return JSONResponse({"detail": public_detail(str(exc))}, status_code=status_of(exc))

    def database_down(request: Request, detail: str) -> JSONResponse:
        """503 without the detail, which names the server's socket or URL: that goes to the log."""
        log.warning("%s %s: %s", request.method, request.url.path, detail)
        return JSONResponse({"detail": DATABASE_DOWN}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form"))
            parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.post("/api/find", tags=["search"], responses={
        400: {"description": "Empty or unreadable image, a class that is not stored, or a max_distance that is no "
                             f"cosine distance (or `{DUPLICATE}` without a calibration)"},
        413: {"description": "Upload over the size limit, or too many pixels"},
        415: {"description": "Not an image in an accepted format"},
        422: {"description": "Invalid mode or k"},
        503: {"description": "Busy decoding other uploads (see Retry-After), or the database is unavailable"},
    })
    async def find(
        request: Request,
        file: Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, BMP, TIFF or GIF).")],
        mode: Annotated[Mode, Form(
            description="all: every stored image; same: the query's class only; other: every other class.")] = "all",
        k: Annotated[int, Form(ge=1, le=MAX_K, description="How many matches.")] = 5,
        query_class: Annotated[str | None, Form(
            alias="class",
            description="The query's class for the class modes [default: a stored copy's, else the top match's].",
        )] = None,
        max_distance: Annotated[str | None, Form(
            description="Drop the matches farther than this cosine distance (0 to 2), after ranking, so fewer than "
                        f"k may come back; `{DUPLICATE}`: the duplicate distance calibrated for the model [default: "
                        "no limit].",
        )] = None,
    ) -> list[dict[str, Any]]:
        """The k stored images closest to the uploaded one: the JSON of `imsearch find --json` (a list with one
        item), each match with its image and thumbnail URL, plus where the query class came from and timings."""
        name = upload_name(file.filename)
        if query_class is not None and "\x00" in query_class:
            raise HTTPException(400, f"{name}: the class holds a NUL byte, which no class name can hold")
        # checked (and the name resolved) once, before the upload is decoded
        limit = await in_thread(imsearch.max_distance, (max_distance or "").strip() or None)
        file_too_large = HTTPException(413, f"{name}: larger than the {megabytes(max_upload_bytes)} upload limit")
        if file.size is not None and file.size > max_upload_bytes:
            raise file_too_large
        # The header alone, from the spooled part: refused or weighed before the body is read into memory.
        header = await slots.read_header(pixels.peek, file.file, name, max_decode_pixels=pixels.UPLOAD_MAX_PIXELS,
                                         prep=imsearch.prep)
        async with slots.hold(header.decode_pixels > LIGHT_PIXELS):
            await file.seek(0)
            data = await file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise file_too_large
            started = time.perf_counter()
            try:  # in a process of its own, killed if the client goes away
                loaded = await decoders.run(load_upload, data, name, imsearch.prep, name=name,
                                            until=lambda: disconnected(request))
            except ClientGone as exc:
                raise HTTPException(400, str(exc)) from None
            item = await in_thread(search_upload, imsearch, loaded, data, name, mode, k,
                                           query_class or None, limit, time.perf_counter() - started)
        for match in item["matches"]:
            match["image"] = str(request.url_for("image", image_id=match["id"]))
            match["thumbnail"] = str(request.url_for("thumbnail", image_id=match["id"]))
        return [item]

    @app.get("/api/classes", tags=["search"])
    async def classes() -> list[dict[str, Any]]:
        """The stored classes with their image counts, largest first."""
        rows = await in_thread(imsearch.classes)
        return [{"class": cls, "images": n} for cls, n in rows]

    @app.get("/api/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Answers while the database does: how many images are stored, and the model in use."""
        count = await in_thread(imsearch.count)
        return {"status": "ok", "images": count, "model": identity, "max_upload_bytes": max_upload_bytes}

    def image_response(data: bytes, media: str, etag: str, request: Request) -> Response:
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=media, headers=headers)

    image_id_param = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="The stored row's id.")]

    @app.get("/images/{image_id}", name="image", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/*": {}}}, 404: {"description": "Not stored, or its file changed"}})
    async def image(image_id: image_id_param, request: Request) -> Response:
        """The stored image's file, as stored (only rows in the database, by id)."""
        row, data = await in_thread(stored_file, imsearch, image_id)
        return image_response(data, media_type(data), f'"{row["sha256"][:32]}"', request)

    @app.get("/images/{image_id}/thumbnail", name="thumbnail", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "Not stored, or its file changed"}})
    async def thumbnail(image_id: image_id_param, request: Request) -> Response:
        """A JPEG of the stored image at most 320 pixels on its long side, cached in memory."""
        row = await in_thread(imsearch.image, image_id)
        cached = thumbnails.get((image_id, row["sha256"])) if row else None
        if row is not None and cached is not None:
            return image_response(cached, "image/jpeg", f'"{row["sha256"][:32]}-t{THUMBNAIL_SIZE}"', request)
        stored, data = await in_thread(stored_file, imsearch, image_id)
        name = f"image {image_id}"
        header = await slots.read_header(pixels.peek, data, name, prep=THUMBNAIL_DRAFT)
        async with slots.hold(header.decode_pixels > LIGHT_PIXELS):
            try:
                thumb = await decoders.run(make_thumbnail, data, name, THUMBNAIL_SIZE, THUMBNAIL_DRAFT, name=name,
                                           until=lambda: disconnected(request))
            except ClientGone as exc:
                raise HTTPException(400, str(exc)) from None
        thumbnails.put((image_id, stored["sha256"]), thumb)
        return image_response(thumb, "image/jpeg", f'"{stored["sha256"][:32]}-t{THUMBNAIL_SIZE}"', request)

    return app
