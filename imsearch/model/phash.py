"""A 64-bit perceptual hash (DCT) of an upright image: finds copies of a photo whatever the model.

It is the `imagehash` package's `phash` (hash size 8, high-frequency factor 4), bit for bit, with the DCT as a
precomputed matrix so that imsearch needs no scipy. It does not depend on the model, so it survives a new model
and needs no embedding. Copies a hash catches: the same bytes, a re-encode, a resize, a copy rotated by its EXIF
orientation (the hash is taken after the EXIF transpose). Copies it misses: crops, flips, rotated pixels.
"""

from __future__ import annotations

from typing import Protocol, Union

import numpy as np
from PIL import Image

HASH_SIZE = 8  # the hash is the sign pattern of the 8x8 lowest frequencies: 64 bits
SIDE = 32  # of the greyscale thumbnail the DCT runs on (HASH_SIZE times imagehash's highfreq_factor 4)
BITS = HASH_SIZE * HASH_SIZE


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """The first `keep` rows of the unnormalised DCT-II matrix of size n, as scipy.fftpack.dct computes it:
    y[k] = 2 * sum_i x[i] * cos(pi * k * (2i + 1) / (2n))."""
    k = np.arange(keep, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    return 2.0 * np.cos(np.pi * k * (2.0 * i + 1.0) / (2.0 * n))


# Only the top-left 8x8 coefficients are kept, so only 8 rows of the 32x32 matrix are needed.
_DCT = _dct_rows(SIDE, HASH_SIZE)


def phash(img: Image.Image) -> int:
    """The 64-bit perceptual hash of an image as an unsigned int; its first bit (row-major) is the most significant.

    Greyscale, 32x32 by Lanczos, 2-D DCT-II (axis 0, then axis 1), bit = low-frequency coefficient > their median.
    """
    grey = np.asarray(img.convert("L").resize((SIDE, SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _DCT @ grey @ _DCT.T  # the DCT along axis 0, then along axis 1, top-left HASH_SIZE x HASH_SIZE
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """How many of the 64 bits differ: 0 for the same picture, a few for a re-encoded or resized copy."""
    return (a ^ b).bit_count()


def to_bits(h: int) -> str:
    """A hash as 64 '0'/'1' characters, most significant bit first: the text PostgreSQL's bit(64) takes."""
    if not 0 <= h < 1 << BITS:
        raise ValueError(f"a perceptual hash is an unsigned {BITS}-bit int, not {h}")
    return format(h, f"0{BITS}b")


class _BitLike(Protocol):
    def to_text(self) -> str: ...


def from_bits(value: Union[str, bytes, _BitLike]) -> int:
    """A bit(64) value read from PostgreSQL as the int `phash` returns.

    psycopg reads bit(64) as text ('0101...') whether pgvector's types are registered or not (pgvector registers
    only a writer, for `pgvector.Bit`), and as PostgreSQL's binary form (a 4-byte length, then the bits) from a
    binary cursor; a `pgvector.Bit` (anything with `to_text()`) is taken too.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) != 4 + BITS // 8 or int.from_bytes(data[:4], "big") != BITS:
            raise ValueError(f"not a {BITS}-bit value: {data!r}")
        return int.from_bytes(data[4:], "big")
    text = value if isinstance(value, str) else value.to_text()
    if len(text) != BITS or text.strip("01"):
        raise ValueError(f"not a {BITS}-bit string: {text!r}")
    return int(text, 2)


__all__ = ["phash", "hamming", "to_bits", "from_bits", "HASH_SIZE", "BITS"]
