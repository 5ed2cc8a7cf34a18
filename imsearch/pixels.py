"""Pixels: open a file as an upright RGB image, cheaply, and cut it the way the model expects.

Every failure becomes a `BadImage` with a reason a person understands.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage

# Refuse images above this many pixels before decoding them (decompression bombs); 12 MP photos are far below.
MAX_PIXELS = 100_000_000
# Refuse files above this many bytes before reading them whole: a 100 MP 16-bit RGBA TIFF is 800 MB.
MAX_BYTES = 1 << 30
# A long strip is resized only where the centre crop keeps it beyond this aspect ratio (see `prepare`).
MAX_FULL_ASPECT = 8

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


def open_image(
    data: bytes, path: str, *, max_pixels: int = MAX_PIXELS, prep: Preprocess | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes into an upright RGB image and its full upright size.

    With `prep`, a JPEG is decoded at the smallest DCT scale that still covers what `prep` resizes to.
    """
    if not data:
        raise BadImage(path, "empty file (0 bytes)")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage(path, f"too many pixels ({width}x{height} > {max_pixels:,}; decompression bomb?)")
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
        if prep is not None and img.format == "JPEG":
            img.draft("RGB", prep.draft_size(*img.size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img), (width, height)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own check, at twice its limit, fires inside open()
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,}" if found else "too many"
        raise BadImage(path, f"too many pixels ({size} > {max_pixels:,}; decompression bomb?)") from None
    except UnidentifiedImageError:
        raise BadImage(path, "not an image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            raise BadImage(path, f"truncated: the file ends before the image does ({reason})") from None
        raise BadImage(path, f"cannot decode: {reason}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: 16-bit scaled down, transparency composited onto white, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / ((hi - lo) or 1.0) * 255.0).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


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


def load(data: bytes, path: str, prep: Preprocess = DEFAULT_PREPROCESS, *, max_pixels: int = MAX_PIXELS) -> Loaded:
    """Bytes of one file -> model input, decoding a JPEG only at the scale the resize needs."""
    img, (width, height) = open_image(data, path, max_pixels=max_pixels, prep=prep)
    return Loaded(prepare(img, prep), width, height)


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

