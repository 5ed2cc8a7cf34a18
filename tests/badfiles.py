"""Awkward and broken image files, made at test time from real room photos: the reliability matrix.

Each `Case` is one file (or folder, link, FIFO) under an ingest root, how to make it from a source photo, and
what imsearch must do with it: store it (`reason` is None) or name it once with a reason starting with `reason`.
Used by tests/test_reliability.py and scripts/reliability_check.py; docs/reliability.md lists the same cases.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bench import hostile

Maker = Callable[[Path, Path], object]  # (target, source photo)


@dataclass(frozen=True)
class Case:
    """One entry of the matrix. `path` is relative to the ingest root; its first folder is the class."""

    id: str
    path: str
    make: Maker
    reason: str | None = None  # None: stored; else how the reported reason starts
    what: str = ""
    reported: str | None = None  # the path named in the report when it is not `path` (a folder)
    alias_of: str | None = None  # a symlink to another case: stored once, under the target's path
    group: str | None = None  # cases of one group are made from the same source photo (twins)

    @property
    def stored(self) -> bool:
        return self.reason is None and self.alias_of is None


# -- makers ------------------------------------------------------------------------------------------------


def _photo(src: Path) -> Image.Image:
    return Image.open(src).convert("RGB")


def _save(fmt: str, **options: object) -> Maker:
    def make(target: Path, src: Path) -> None:
        _photo(src).save(target, fmt, **options)
    return make


def _bytes(fn: Callable[[bytes], bytes]) -> Maker:
    def make(target: Path, src: Path) -> None:
        target.write_bytes(fn(src.read_bytes()))
    return make


def _garbage(data: bytes, start: int, length: int) -> bytes:
    rng = random.Random(start)
    out = bytearray(data)
    out[start:start + length] = bytes(rng.randrange(256) for _ in range(length))
    return bytes(out)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit grey) but holds one row of data: a bomb by its header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def png_one_colour(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of one colour: tens of kilobytes on disk, width x height pixels decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    chunks = [packer.compress(row * 100) for _ in range(height // 100)]
    chunks += [packer.compress(row * (height % 100)), packer.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(chunks))
            + _png_chunk(b"IEND", b""))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _upright(src: Path) -> Image.Image:
    """A landscape crop (416x320: whole JPEG blocks either way up), so a lost rotation shows in width/height."""
    img = _photo(src)
    return img.crop((0, 0, 416, 320)) if img.size == (416, 416) else img


# The twins are saved at the same (high) quality: JPEG re-encoding alone moves the stand-in model's vectors
# by up to 0.01 at quality 95, the lossless PNG pair shows the rotation itself is exact.
JPEG_TWIN = {"quality": 100, "subsampling": 0}
# EXIF Orientation 6: 'rotate 90 degrees clockwise to show'; 8: 'rotate 90 anticlockwise to show'.
STORED_SIDEWAYS = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def exif_rotated(fmt: str, orientation: int) -> Maker:
    """The upright photo stored on its side, with the EXIF orientation that puts it upright again."""
    def make(target: Path, src: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options = JPEG_TWIN if fmt == "JPEG" else {}
        _upright(src).transpose(STORED_SIDEWAYS[orientation]).save(target, fmt, exif=exif, **options)
    return make


def upright_twin(fmt: str) -> Maker:
    def make(target: Path, src: Path) -> None:
        _upright(src).save(target, fmt, **(JPEG_TWIN if fmt == "JPEG" else {}))
    return make


def _frames(src: Path) -> list[Image.Image]:
    img = _photo(src)
    return [img, img.transpose(Image.Transpose.ROTATE_180), img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]


def _animated_gif(src: Path) -> bytes:
    frames = _frames(src)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def animated_gif(target: Path, src: Path) -> None:
    target.write_bytes(_animated_gif(src))


def gif_frame(index: int) -> Maker:
    """Frame `index` of the animated GIF as Pillow decodes it, saved losslessly as PNG."""
    def make(target: Path, src: Path) -> None:
        gif = Image.open(io.BytesIO(_animated_gif(src)))
        gif.seek(index)
        target.write_bytes(_png_bytes(gif.convert("RGB")))
    return make


def animated_webp(target: Path, src: Path) -> None:
    frames = _frames(src)
    frames[0].save(target, "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=100)


def webp_first_frame(target: Path, src: Path) -> None:
    target.write_bytes(_png_bytes(_frames(src)[0]))


def cmyk_jpeg(target: Path, src: Path) -> None:
    _photo(src).convert("CMYK").save(target, "JPEG", quality=90)


def grey16_png(target: Path, src: Path) -> None:
    grey = np.asarray(_photo(src).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(target, "PNG")  # mode I;16: a 16-bit greyscale PNG


def rgba_png(target: Path, src: Path) -> None:
    img = _photo(src).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, img.width, dtype=np.uint8), (img.height, 1))
    img.putalpha(Image.fromarray(alpha))
    img.save(target, "PNG")


def palette_transparent_png(target: Path, src: Path) -> None:
    img = _photo(src).convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    img.save(target, "PNG", transparency=0)


def strip_png(width: int, height: int) -> Maker:
    def make(target: Path, src: Path) -> None:
        _photo(src).resize((width, height)).save(target, "PNG")
    return make


def many_scans(times: int) -> Maker:
    """The photo as a progressive JPEG saved by Pillow, its last scan there `times` more times."""
    def make(target: Path, src: Path) -> None:
        out = io.BytesIO()
        _photo(src).save(out, "JPEG", progressive=True, quality=90)
        target.write_bytes(hostile.repeat_last_scan(out.getvalue(), times))
    return make


def many_strips(height: int) -> Maker:
    def make(target: Path, src: Path) -> None:
        target.write_bytes(hostile.many_strip_tiff(height))
    return make


def text_file(target: Path, src: Path) -> None:
    target.write_text("These are my holiday notes, not a photo.\n")


def empty(target: Path, src: Path) -> None:
    target.write_bytes(b"")


def sparse(size: int) -> Maker:
    """A file of `size` bytes that takes no disk space (a hole): too large to read whole."""
    def make(target: Path, src: Path) -> None:
        with open(target, "wb") as f:
            f.truncate(size)
    return make


def fifo(target: Path, src: Path) -> None:
    os.mkfifo(target)


def dangling(target: Path, src: Path) -> None:
    target.symlink_to(target.parent / "no-such-photo.jpg")


def loop(target: Path, src: Path) -> None:
    target.symlink_to(target.parent, target_is_directory=True)


def copy(target: Path, src: Path) -> None:
    target.write_bytes(src.read_bytes())


def link_to(relative: str) -> Maker:
    def make(target: Path, src: Path) -> None:
        target.symlink_to(relative)
    return make


SQL = "x'); DROP TABLE images; --"
NOT_UTF8 = os.fsdecode(b"latin1-caf\xe9")  # bytes that are not UTF-8: Python holds them as surrogates

CASES: tuple[Case, ...] = (
    # -- refused, each named once --------------------------------------------------------------------------
    Case("corrupt-header", "kitchen/corrupt-header.jpg", _bytes(lambda d: _garbage(d, 2, 200)),
         "not an image", "JPEG whose header bytes are overwritten"),
    Case("corrupt-data", "kitchen/corrupt-data.jpg", _bytes(lambda d: _garbage(d, len(d) // 3, 2000)),
         "cannot decode", "JPEG with 2,000 random bytes in its compressed data"),
    Case("truncated-jpeg", "kitchen/truncated.jpg", _bytes(lambda d: d[: len(d) * 6 // 10]),
         "truncated", "JPEG cut at 60 % of its bytes"),
    Case("truncated-png", "kitchen/truncated.png",
         lambda t, s: t.write_bytes(_half(_png_bytes(_photo(s)))),
         "truncated", "PNG cut at half its bytes"),
    Case("empty", "kitchen/empty.jpg", empty, "empty file (0 bytes)", "0-byte file"),
    Case("text", "kitchen/notes.jpg", text_file, "not an image", "text file named .jpg"),
    Case("bomb-header", "kitchen/bomb-header.png", lambda t, s: t.write_bytes(png_header_only(100_000, 100_000)),
         "too many pixels", "PNG header declaring 100000x100000 (a few bytes)"),
    Case("bomb-real", "kitchen/bomb-real.png", lambda t, s: t.write_bytes(png_one_colour(20_000, 20_000)),
         "too many pixels", "valid 20000x20000 one-colour PNG (48 KB)"),
    Case("many-scans", "kitchen/many-scans.jpg", many_scans(300), "too many scans to decode",
         "progressive JPEG whose last scan is repeated 300 times"),
    Case("many-strips", "kitchen/many-strips.tif", many_strips(300_000), "too many TIFF strips to read",
         "1x300000 TIFF in one-row strips (300,000 strip offsets)"),
    Case("too-large", "kitchen/huge.tif", sparse(3 << 30), "file too large",
         "3 GiB file named .tif (sparse: no disk space); read whole, it would take 3 GiB of memory"),
    Case("fifo", "kitchen/pipe.jpg", fifo, "not a regular file", "FIFO named .jpg (reading it would block)"),
    Case("dangling", "kitchen/dangling.jpg", dangling, "broken symlink", "symlink to a file that does not exist"),
    Case("symlink-loop", "kitchen/loop", loop, "symlink to a folder already visited",
         "folder symlink pointing at its own parent"),
    Case("folder-alias", "a-link-to-kitchen", link_to("kitchen"), "symlink to a folder already visited",
         "class folder symlink to another class folder, sorted before it: the files keep their own class"),
    Case("not-utf8-name", f"kitchen/{NOT_UTF8}.jpg", copy, "name is not valid UTF-8",
         "good photo whose file name bytes are Latin-1, not UTF-8"),
    Case("not-utf8-class", f"{NOT_UTF8}-class/photo.jpg", copy, "name is not valid UTF-8",
         "class folder whose name bytes are not UTF-8", reported=f"{NOT_UTF8}-class"),
    Case("bad-newline-name", "kitchen/empty\nsecond line.jpg", empty, "empty file (0 bytes)",
         "0-byte file with a newline in its name (reported on one line, escaped)"),
    # -- stored ------------------------------------------------------------------------------------------------
    Case("cmyk", "bedroom/cmyk.jpg", cmyk_jpeg, what="CMYK JPEG"),
    Case("grey16", "bedroom/grey16.png", grey16_png, what="16-bit greyscale PNG"),
    Case("rgba", "bedroom/rgba.png", rgba_png, what="RGBA PNG, alpha from 0 to 255"),
    Case("palette-transparent", "bedroom/palette.png", palette_transparent_png,
         what="palette PNG with a transparent colour"),
    Case("grey", "bedroom/grey.jpg", lambda t, s: _photo(s).convert("L").save(t, "JPEG"), what="greyscale JPEG"),
    Case("bmp", "bedroom/photo.bmp", _save("BMP"), what="BMP"),
    Case("tiff", "bedroom/photo.tif", _save("TIFF", compression="tiff_lzw"), what="LZW TIFF"),
    Case("upper-suffix", "bedroom/PHOTO.JPEG", copy, what="upper-case suffix"),
    Case("tiny", "bedroom/tiny.png", strip_png(1, 1), what="1x1 pixel PNG"),
    Case("strip", "bedroom/strip.png", strip_png(1, 20_000),
         what="1x20000 PNG (the resize would make a 256x5,120,000 frame)"),
    Case("exif-rotated", "dining_room/exif-rotated.jpg", exif_rotated("JPEG", 6), group="exif",
         what="JPEG stored on its side with EXIF Orientation 6"),
    Case("exif-twin", "dining_room/exif-twin.jpg", upright_twin("JPEG"), group="exif",
         what="the same photo with upright pixels"),
    Case("exif-rotated-png", "dining_room/exif-rotated.png", exif_rotated("PNG", 8), group="exif",
         what="PNG stored on its side with EXIF Orientation 8"),
    Case("exif-twin-png", "dining_room/exif-twin.png", upright_twin("PNG"), group="exif",
         what="the same photo with upright pixels, PNG"),
    Case("animated-gif", "dining_room/animated.gif", animated_gif, group="gif", what="3-frame animated GIF"),
    Case("gif-frame-0", "dining_room/gif-frame-0.png", gif_frame(0), group="gif", what="its first frame as PNG"),
    Case("gif-frame-1", "dining_room/gif-frame-1.png", gif_frame(1), group="gif", what="its second frame as PNG"),
    Case("animated-webp", "dining_room/animated.webp", animated_webp, group="webp",
         what="3-frame lossless animated WebP"),
    Case("webp-frame-0", "dining_room/webp-frame-0.png", webp_first_frame, group="webp",
         what="its first frame as PNG"),
    Case("space", "living_room/with space.jpg", copy, what="space in the name"),
    Case("quotes", "living_room/it's \"quoted\" `tick`.jpg", copy, what="quotes and backticks in the name"),
    Case("non-ascii", "living_room/café ünïcode 日本語 😀.jpg", copy, what="non-ASCII name"),
    Case("sql-name", f"living_room/{SQL}.jpg", copy, what="SQL-looking name"),
    Case("format-name", "living_room/%s %(x)s {0} $HOME.jpg", copy, what="format and shell characters"),
    Case("dash-name", "living_room/-rf.jpg", copy, what="name starting with a dash"),
    Case("newline-name", "living_room/two\nlines.jpg", copy, what="newline in the name"),
    Case("folder-named-jpg", "living_room/album.jpg/inside.jpg", copy,
         what="photo inside a folder named album.jpg"),
    Case("sql-class", f"{SQL}/photo.jpg", copy, what="class folder with an SQL-looking name"),
    Case("odd-class", "Küche & 'salle' de bain/photo.jpg", copy, what="class folder with non-ASCII and quotes"),
    Case("space-class", "with space/photo.jpg", copy, what="class folder with a space"),
    Case("alias-before", "bathroom/alias.jpg", link_to("../living_room/with space.jpg"),
         alias_of="living_room/with space.jpg",
         what="symlink to a photo of another class, in a folder walked before it: stored once, own class"),
    Case("alias-after", "with space/alias.jpg", link_to("../living_room/-rf.jpg"), alias_of="living_room/-rf.jpg",
         what="symlink to a photo of another class, in a folder walked after it: stored once, own class"),
)

BAD = tuple(c for c in CASES if c.reason is not None)
GOOD = tuple(c for c in CASES if c.stored)


def build(root: Path, sources: list[Path], cases: tuple[Case, ...] = CASES) -> Path:
    """Make every case under root; cases take distinct source photos, twins of a group the same one."""
    groups: dict[str, Path] = {}
    for case in cases:
        key = case.group or case.id
        src = groups.setdefault(key, sources[len(groups) % len(sources)])
        target = root / case.path
        target.parent.mkdir(parents=True, exist_ok=True)
        case.make(target, src)
    return root


def reported_path(root: Path, case: Case) -> str:
    """The path imsearch names for a bad case (folders as walked, files resolved)."""
    return str(root.resolve() / (case.reported or case.path))
