"""Pixels: open a file as an upright RGB image, cheaply, and cut it the way the model expects.

Every failure becomes a `BadImage` with a reason a person understands.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import BadImage, NotAnImage, TooCostly, TooManyPixels
from .phash import phash

# The formats of files.IMAGE_SUFFIXES, and the only ones Pillow is asked to open: with all its plugins, an EPS file
# named .jpg went to Ghostscript, and every other decoder Pillow carries was one upload away.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# Refuse images above this many pixels before decoding them (decompression bombs); 12 MP photos are far below.
MAX_PIXELS = 100_000_000
# An upload to the web page may make its decode hold at most this many pixels: a one-scan JPEG counts at its draft
# scale (a 50 MP phone JPEG decodes at an eighth of its width), a WebP double (WEBP_WEIGHT), any other file in full.
# At the measured worst of 12 bytes a pixel on the way to RGB (a 16-bit RGBA TIFF in one strip) one decode stays
# under 500 MB, where a 100 MP 1-bit PNG took 470 MB and a 16-bit one a gigabyte; 40 MP still takes an 8K frame
# (33 MP) or a 36 MP camera's full-size TIFF. bench/uploads.py measures a server under such uploads.
UPLOAD_MAX_PIXELS = 40_000_000
# libwebp holds a WebP's frame twice (its canvas and a copy) and Pillow once more: 17 bytes a pixel on the way to
# RGB, against 4 to 12 for the other formats, so a WebP pixel counts as two.
WEBP_WEIGHT = 2
# Refuse files above this many bytes before reading them whole: a 100 MP 16-bit RGBA TIFF is 800 MB.
MAX_BYTES = 1 << 30
# A progressive JPEG is decoded scan by scan, and each scan walks the coefficients of the whole image (about 1 ns a
# pixel here, whatever the scan holds): a 4000x2900 file whose last scan is repeated 3,000 times is 180 kB and takes
# 30 s. libjpeg's progressive script writes 10 scans, mozjpeg's scan optimisation 9 to 16; refused above
# MAX_JPEG_SCANS, or above MAX_SCAN_PIXELS scans x pixels (a 100 MP photo in 20 scans; about 2 s of one core).
MAX_JPEG_SCANS = 100
MAX_SCAN_PIXELS = 2_000_000_000
# Pillow reads every strip or tile offset of a TIFF while opening it (3 million one-row strips: 7 s and 1 GB before
# a pixel is decoded). Cameras and scanners write strips of 8 kB or more, or tiles: a 100 MP RGB image in one-row
# strips has 10,000. Refused above MAX_TIFF_CHUNKS strips or tiles (65,536 open and decode in 0.5 s and 40 MB), or
# with an IFD of more than MAX_TIFF_ENTRIES entries (cameras write a few dozen), read from the header before Pillow.
MAX_TIFF_CHUNKS = 65_536
MAX_TIFF_ENTRIES = 4_096
# A long strip is resized only where the centre crop keeps it beyond this aspect ratio (see `prepare`).
MAX_FULL_ASPECT = 8
# `to_rgb` converts large images this many pixels at a time, so that its float and RGBA copies stay small.
STRIP_PIXELS = 1 << 20

# Pillow warns about damaged metadata in files it still decodes, and about large images, which MAX_PIXELS
# handles. A global filter, because `warnings.catch_warnings` is not thread-safe and files decode in threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes the model's input; its `id` is part of the model identity stored per row.

    `recipe` is torchvision's ImageNet recipe (resize the short side to 256, centre-crop 224);
    `square224` squeezes the whole frame to 224x224; `seed1028x768` is the seed study's whole frame at 1028x768.
    """

    name: str
    resize: int | tuple[int, int]
    crop: int | None

    @property
    def id(self) -> str:
        if isinstance(self.resize, tuple):
            return f"whole{self.resize[0]}x{self.resize[1]}"
        return f"resize{self.resize}-crop{self.crop}"

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The JPEG decode size: twice what the resize needs, so the antialiased resize still does the filtering.

        Decoding at exactly the needed scale (DCT scaling) moved vectors to cosine 0.987 against a full decode;
        twice the size keeps them >= 0.99 at about a fifth of the full decode's cost (tests/test_embed.py).
        """
        if isinstance(self.resize, tuple):
            return 2 * self.resize[0], 2 * self.resize[1]
        scale = 2 * self.resize / min(width, height)
        return math.ceil(width * scale), math.ceil(height * scale)


PREPROCESSING = {
    "recipe": Preprocess("recipe", 256, 224),
    "square224": Preprocess("square224", (224, 224), None),
    "seed1028x768": Preprocess("seed1028x768", (1028, 768), None),
}
DEFAULT_PREPROCESS = PREPROCESSING["recipe"]


@dataclass(frozen=True)
class Loaded:
    """A decoded photo: model input (uint8, HxWx3) and what the row records about the file."""

    pixels: np.ndarray
    width: int
    height: int
    phash: int  # perceptual hash of the upright image (imsearch.model.phash), taken before `prepare`


# What Pillow raises on a file it cannot read (UnidentifiedImageError is an OSError); see `bad_image`.
UNREADABLE = (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True)
class Header:
    """What an image file says of itself before it is decoded: enough to refuse it, or to plan its decode."""

    format: str
    mode: str
    width: int
    height: int
    decode_pixels: int  # what its decode holds at once, in pixels (see `_open`)


def peek(
    source: bytes | IO[bytes], path: str, *, max_pixels: int = MAX_PIXELS, max_decode_pixels: int | None = None,
    prep: Preprocess | None = None,
) -> Header:
    """Read a file's header and refuse it as `open_image` would, without decoding a pixel.

    A file object (the web page's spooled upload) is read in blocks, never whole.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        img, (width, height), decoded = _open(fp, path, max_pixels, max_decode_pixels, prep)
    except UNREADABLE as exc:
        raise bad_image(path, exc) from None
    return Header(img.format or "", img.mode, width, height, decoded)


def open_image(
    data: bytes, path: str, *, max_pixels: int = MAX_PIXELS, max_decode_pixels: int | None = None,
    prep: Preprocess | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes into an upright RGB image and its full upright size.

    With `prep`, a JPEG is decoded at the smallest DCT scale that still covers what `prep` resizes to.
    """
    try:
        img, (width, height), _ = _open(io.BytesIO(data), path, max_pixels, max_decode_pixels, prep)
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: a copy would double an upright image's memory
        return to_rgb(img), (width, height)
    except UNREADABLE as exc:
        raise bad_image(path, exc) from None


def _open(
    fp: IO[bytes], path: str, max_pixels: int, max_decode_pixels: int | None, prep: Preprocess | None
) -> tuple[ImageFile.ImageFile, tuple[int, int], int]:
    """A file's header opened in one of FORMATS, with a JPEG's draft scale set; its full size; and how many pixels
    its decode holds at once. Refused over either cap, and where the decode would cost far more than its pixels:
    a TIFF's strips and tiles are counted before Pillow reads them, a JPEG's scans before it is decoded.

    A drafted JPEG counts at its draft scale only when it has one scan: for a progressive or multi-scan one,
    libjpeg keeps the coefficients of the whole image whatever the scale (577 MB for a 100 MP progressive file).
    A WebP counts WEBP_WEIGHT times its pixels.
    """
    magic = fp.read(4)
    if not magic:
        raise BadImage(path, "empty file (0 bytes)")
    if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _check_tiff(fp, path)
    img = Image.open(fp, formats=FORMATS)
    first_scan = fp.tell()  # Pillow reads a JPEG's markers up to its first start-of-scan, and no further
    width, height = img.size
    if width * height > max_pixels:
        raise TooManyPixels(path, f"too many pixels ({width}x{height} > {max_pixels:,}; decompression bomb?)")
    several_scans = False
    if img.format == "JPEG":
        scans = count_scans(fp, first_scan)
        if scans > MAX_JPEG_SCANS or scans * width * height > MAX_SCAN_PIXELS:
            raise TooCostly(path, f"too many scans to decode ({scans:,} scans of {width}x{height}; at most "
                                  f"{MAX_JPEG_SCANS} scans and {MAX_SCAN_PIXELS:,} scans x pixels)")
        if prep is not None:
            img.draft("RGB", prep.draft_size(width, height))
            several_scans = scans > 1 and img.size != (width, height)
    decoded = width * height if several_scans else img.width * img.height
    if img.format == "WEBP":
        decoded *= WEBP_WEIGHT
    if max_decode_pixels is not None and decoded > max_decode_pixels:
        kind = ""
        if several_scans:
            kind = " progressive or multi-scan JPEG"
        elif img.format == "WEBP":
            kind = " WebP, counted double"
        raise TooManyPixels(path, f"too many pixels ({width}x{height}{kind} > {max_decode_pixels:,} to decode for "
                                  "an upload; decompression bomb?)")
    return img, (width, height), decoded


def count_scans(fp: IO[bytes], start: int) -> int:
    """How many start-of-scan markers a JPEG has, the one before `start` included, up to its end-of-image marker.

    Coded data escapes every 0xFF byte, so a marker is a marker; read in blocks, never whole. Data after the end of
    the image (a phone's motion-photo video) is not counted: the decoder stops there.
    """
    fp.seek(start)
    scans, last = 1, b""
    while block := fp.read(1 << 20):
        data = last + block
        end = data.find(b"\xff\xd9")
        if end >= 0:
            return scans + data.count(b"\xff\xda", 0, end)
        scans += data.count(b"\xff\xda", 0, len(data) - 1)  # a marker split across blocks is counted next time
        last = data[-1:]
    return scans


# StripOffsets, StripByteCounts, TileOffsets, TileByteCounts: the arrays Pillow reads whole while opening.
TIFF_CHUNK_TAGS = {273: "strips", 279: "strips", 324: "tiles", 325: "tiles"}


def _check_tiff(fp: IO[bytes], path: str) -> None:
    """Refuse a TIFF whose first IFD declares more than MAX_TIFF_CHUNKS strips or tiles, or more than
    MAX_TIFF_ENTRIES entries, from that IFD alone (classic TIFF or BigTIFF, either byte order)."""
    fp.seek(0)
    head = fp.read(16)
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    if big:
        if len(head) < 16:
            raise BadImage(path, "truncated: the file ends before the TIFF header does")
        first = struct.unpack(order + "Q", head[8:16])[0]
        count_format, entry_size, entry_format = "Q", 20, "HHQ"
    else:
        if len(head) < 8:
            raise BadImage(path, "truncated: the file ends before the TIFF header does")
        first = struct.unpack(order + "I", head[4:8])[0]
        count_format, entry_size, entry_format = "H", 12, "HHI"
    fp.seek(first)
    raw = fp.read(struct.calcsize(count_format))
    if len(raw) < struct.calcsize(count_format):
        return  # Pillow names what is wrong with an IFD that is not there
    entries = struct.unpack(order + count_format, raw)[0]
    if entries > MAX_TIFF_ENTRIES:
        raise TooCostly(path, f"too many TIFF entries to read ({entries:,} in one IFD > {MAX_TIFF_ENTRIES:,})")
    table = fp.read(entries * entry_size)
    for at in range(0, len(table) - entry_size + 1, entry_size):
        tag, _, count = struct.unpack_from(order + entry_format, table, at)
        if tag in TIFF_CHUNK_TAGS and count > MAX_TIFF_CHUNKS:
            raise TooCostly(path, f"too many TIFF {TIFF_CHUNK_TAGS[tag]} to read ({count:,} > {MAX_TIFF_CHUNKS:,}; "
                                  "no camera or scanner writes so many)")


def bad_image(path: str, exc: BaseException) -> BadImage:
    """What Pillow raised while reading a file, as a BadImage with a reason a person understands."""
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own check, at twice its limit, inside open()
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,}" if found else "too many"
        return TooManyPixels(path, f"too many pixels ({size} > {MAX_PIXELS:,}; decompression bomb?)")
    if isinstance(exc, UnidentifiedImageError):
        return NotAnImage(path, "not an image (unknown or unsupported format)")
    reason = str(exc) or type(exc).__name__
    if "truncated" in reason.lower():
        return BadImage(path, f"truncated: the file ends before the image does ({reason})")
    return BadImage(path, f"cannot decode: {reason}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: 16-bit scaled down, transparency composited onto white, CMYK converted.

    Converted STRIP_PIXELS at a time where a whole-image float or RGBA copy would take several times the image.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        top = 65535.0 if img.mode.startswith("I;16") or _extrema(img)[1] > 255 else 255.0
        img = _to_grey(img, lambda arr: np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        lo, hi = _extrema(img)
        img = _to_grey(img, lambda arr: ((arr - lo) / ((hi - lo) or 1.0) * 255.0).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or img.mode == "P" and "transparency" in img.info:
        out = Image.new("RGB", img.size)
        for box in _strips(img):
            part = img.crop(box).convert("RGBA")
            background = Image.new("RGBA", part.size, (255, 255, 255, 255))
            out.paste(Image.alpha_composite(background, part).convert("RGB"), box[:2])
        return out
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _extrema(img: Image.Image) -> tuple[float, float]:
    lo, hi = img.getextrema()
    return float(lo), float(hi)  # type: ignore[arg-type]


def _strips(img: Image.Image) -> Iterator[tuple[int, int, int, int]]:
    rows = max(1, STRIP_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        yield 0, top, img.width, min(img.height, top + rows)


def _to_grey(img: Image.Image, scale: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """An 8-bit greyscale image of a 16/32-bit one, through `scale` on float64 strips."""
    out = Image.new("L", img.size)
    for box in _strips(img):
        out.paste(Image.fromarray(scale(np.asarray(img.crop(box), dtype=np.float64)), "L"), box[:2])
    return out


def prepare(img: Image.Image, prep: Preprocess = DEFAULT_PREPROCESS) -> np.ndarray:
    """Resize and crop an RGB image into the model's uint8 input (HxWx3), as torchvision's recipe does."""
    if isinstance(prep.resize, tuple):
        out = img.resize(prep.resize, Image.Resampling.BILINEAR)
    else:
        w, h = img.size
        short, long_ = (w, h) if w <= h else (h, w)
        new_short, new_long = prep.resize, int(prep.resize * long_ / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if prep.crop and new_long > MAX_FULL_ASPECT * new_short:
            # A strip such as 1x20000 pixels would first become a 256x5,120,000 frame (gigabytes) to keep 224x224
            # of it: resize only the box the centre crop keeps (the same pixels to within one level).
            return np.asarray(center_crop_resized(img, size, prep.crop), dtype=np.uint8)
        out = img.resize(size, Image.Resampling.BILINEAR)
        if prep.crop:
            out = center_crop(out, prep.crop)
    return np.asarray(out, dtype=np.uint8)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's centre crop (same rounding)."""
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def center_crop_resized(img: Image.Image, size: tuple[int, int], crop: int) -> Image.Image:
    """`center_crop(img.resize(size), crop)` without making the whole resized frame."""
    w, h = img.size
    top = int(round((size[1] - crop) / 2.0))
    left = int(round((size[0] - crop) / 2.0))
    sx, sy = w / size[0], h / size[1]
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), Image.Resampling.BILINEAR, box=box)


def load(
    data: bytes, path: str, prep: Preprocess = DEFAULT_PREPROCESS, *, max_pixels: int = MAX_PIXELS,
    max_decode_pixels: int | None = None,
) -> Loaded:
    """Bytes of one file -> model input and perceptual hash, decoding a JPEG only at the scale the resize needs.

    The hash is taken from the same upright decode (a JPEG at its draft scale): `imsearch db backfill-hashes`
    decodes with the row's preprocessing, so it gets the same hash.
    """
    img, (width, height) = open_image(data, path, max_pixels=max_pixels, max_decode_pixels=max_decode_pixels,
                                      prep=prep)
    return Loaded(prepare(img, prep), width, height, phash(img))


def read_file(path: Path, max_bytes: int = MAX_BYTES) -> bytes:
    """Read a whole regular file, turning OS errors into a BadImage naming the reason; refuse one over max_bytes.

    Opened without blocking and checked before reading: a FIFO or a device would otherwise hold the caller (a
    worker thread of the web page, a `find`) until someone writes to it.
    """
    try:
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise BadImage(str(path), "not a regular file")
            size = info.st_size
            data = f.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise BadImage(str(path), f"cannot read ({exc.strerror or exc})") from None
    if size > max_bytes or len(data) > max_bytes:
        raise BadImage(str(path), f"file too large ({max(size, len(data)):,} bytes > {max_bytes:,})")
    return data

