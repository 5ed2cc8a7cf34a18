"""Pictures with Pillow: a query beside its ranked matches (the seed study's grid), and a class heatmap.

In a grid every match is captioned with its rank, class and cosine distance, and framed in blue when it is of
the query's class, in orange when it is of another (a pair that colour-blind readers tell apart too).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from ..errors import BadImage
from ..model.pixels import FORMATS, MAX_PIXELS, read_file, to_rgb
from ..search import Match

SAME = (31, 119, 180)  # blue: a match of the query's class
OTHER = (255, 127, 14)  # orange: a match of another class
QUERY = (40, 40, 40)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
# Grid layout in pixels: margin between tiles, frame width, header above and captions below the tiles.
PAD, BORDER, HEADER, CAPTION = 12, 5, 30, 42

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def font(size: int) -> Font:
    """Pillow's bundled font at a size (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def thumbnail(source: str | Path | Image.Image, size: int) -> Image.Image:
    """The image fitted into size x size, upright and RGB; a grey tile saying why when it cannot be read."""
    try:
        if isinstance(source, Image.Image):
            img = source.copy()
        else:
            # The formats imsearch accepts, a regular file, and the pixel cap ingest applies, as for any decode.
            if not Path(source).exists():
                raise FileNotFoundError(source)
            img = Image.open(io.BytesIO(read_file(Path(source))), formats=FORMATS)
            if img.width * img.height > MAX_PIXELS:
                raise ValueError("too many pixels")
            img.draft("RGB", (2 * size, 2 * size))
            img.load()
        img = to_rgb(ImageOps.exif_transpose(img))
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        return img
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, BadImage) as exc:
        tile = Image.new("RGB", (size, size), (220, 220, 220))
        reason = "file missing" if isinstance(exc, FileNotFoundError) else "cannot read"
        ImageDraw.Draw(tile).text((size // 2, size // 2), reason, fill=MUTED, font=font(13), anchor="mm")
        return tile


def grid(
    query: str | Path | Image.Image,
    query_class: str | None,
    matches: Sequence[Match],
    *,
    mode: str | None = "all",
    title: str | None = None,
    tile: int = 200,
    cache: dict[str, Image.Image] | None = None,
    subject: str = "query",
    captions: Sequence[tuple[str, str]] | None = None,
) -> Image.Image:
    """The query on the left, then its matches by rank, each framed and captioned.

    `cache` keeps match thumbnails by path across grids (a report draws the same stored images many times).
    Other pictures than a query's (the audit's) set `mode` None (the header is the title alone, shortened to fit
    beside the legend), `subject` (the first tile's caption) and `captions` (each match's two lines, in place of
    its rank and class, and its distance).
    """
    pad, border, header = PAD, BORDER, HEADER
    cell = tile + 2 * border
    width = pad + (len(matches) + 1) * (cell + pad)
    height = header + cell + CAPTION + pad
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    small, big = font(13), font(15)
    name = title if title is not None else (Path(query).name if not isinstance(query, Image.Image) else "query")
    legend: list[tuple[str, tuple[int, int, int], int, int]] = []
    legend_x = width - pad
    for label, colour in (("other class", OTHER), ("same class", SAME)):
        w = int(draw.textlength(label, font=small))
        legend.append((label, colour, legend_x, w))
        legend_x -= w + 32
    heading = f"{name}  ·  mode {mode}" if mode is not None else _fit(name, legend_x - 2 * pad, draw, big)
    draw.text((pad, 8), heading, fill=TEXT, font=big)
    for label, colour, x, w in legend:
        draw.text((x - w, 10), label, fill=TEXT, font=small)
        draw.rectangle((x - w - 18, 10, x - w - 6, 22), fill=colour)

    def place(i: int, image: Image.Image, colour: tuple[int, int, int], lines: tuple[str, str]) -> None:
        x, _ = frame_origin(i, tile)
        draw.rectangle((x, header, x + cell - 1, header + cell - 1), fill=colour)
        inner = Image.new("RGB", (tile, tile), (245, 245, 245))
        inner.paste(image, ((tile - image.width) // 2, (tile - image.height) // 2))
        out.paste(inner, (x + border, header + border))
        draw.text((x + cell // 2, header + cell + 4), lines[0], fill=TEXT, font=small, anchor="ma")
        draw.text((x + cell // 2, header + cell + 22), lines[1], fill=MUTED, font=small, anchor="ma")

    place(0, thumbnail(query, tile), QUERY, (subject, _fit(query_class or "no class", tile, draw, small)))
    for i, m in enumerate(matches, start=1):
        colour = SAME if query_class is not None and m.cls == query_class else OTHER
        if captions is None:
            label, second = _fit(f"#{m.rank} {m.cls or 'no class'}", tile, draw, small), f"distance {m.distance:.4f}"
        else:
            label, second = (_fit(line, tile, draw, small) for line in captions[i - 1])
        if cache is None:
            thumb = thumbnail(m.path, tile)
        elif m.path in cache:
            thumb = cache[m.path]
        else:
            thumb = cache[m.path] = thumbnail(m.path, tile)
        place(i, thumb, colour, (label, second))
    return out


def frame_origin(i: int, tile: int = 200) -> tuple[int, int]:
    """Top-left corner of the i-th frame in a grid (0: the query, then the matches by rank)."""
    return PAD + i * (tile + 2 * BORDER + PAD), HEADER


def heatmap(
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    cell: int = 64,
) -> Image.Image:
    """A matrix of shares in [0, 1], one row per query class, the share written in each cell.

    Darker is larger, scaled to the largest cell so that the pattern shows even when every share is small.
    """
    small, big = font(13), font(15)
    note = "rows: query class · columns: class of the matches · each row sums to 1"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 16 + max([int(probe.textlength(r, font=small)) for r in rows] + [60])
    top = 40 + max([int(probe.textlength(c, font=small)) for c in columns] + [40])
    width = max(left + cell * len(columns), int(probe.textlength(title, font=big)),
                int(probe.textlength(note, font=small))) + 16
    height = top + cell * len(rows) + 36
    peak = max([v for row in values for v in row] + [0.0]) or 1.0
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    draw.text((8, 8), title, fill=TEXT, font=big)
    for j, c in enumerate(columns):
        label = Image.new("RGB", (int(probe.textlength(c, font=small)) + 4, 16), BACKGROUND)
        ImageDraw.Draw(label).text((2, 0), c, fill=TEXT, font=small)
        rotated = label.rotate(90, expand=True)
        out.paste(rotated, (left + j * cell + (cell - rotated.width) // 2, top - rotated.height - 6))
    for i, r in enumerate(rows):
        draw.text((left - 8, top + i * cell + cell // 2), r, fill=TEXT, font=small, anchor="rm")
        for j, v in enumerate(values[i]):
            x, y = left + j * cell, top + i * cell
            shade = v / peak
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_blue(shade), outline=(200, 200, 200))
            draw.text((x + cell // 2, y + cell // 2), f"{v:.2f}", fill=(255, 255, 255) if shade > 0.55 else TEXT,
                      font=small, anchor="mm")
    draw.text((8, height - 24), note, fill=MUTED, font=small)
    return out


def side_by_side(pictures: Sequence[Image.Image], gap: int = 24) -> Image.Image:
    """Pictures in one row on a white background."""
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    out = Image.new("RGB", (max(width, 1), max([p.height for p in pictures] + [1])), BACKGROUND)
    x = 0
    for p in pictures:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def _blue(v: float) -> tuple[int, int, int]:
    v = min(max(v, 0.0), 1.0)
    return (int(255 - v * (255 - 8)), int(255 - v * (255 - 48)), int(255 - v * (255 - 107)))


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw, f: Font) -> str:
    """Shorten text with an ellipsis until it fits width pixels."""
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "…", font=f) > width:
        text = text[:-1]
    return text + "…"
