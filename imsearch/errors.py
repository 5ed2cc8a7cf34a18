"""The errors imsearch raises; the CLI and the web page turn each into one line for a person."""

from __future__ import annotations


class ImsearchError(Exception):
    """Base class: anything imsearch can explain in one line."""


class BadImage(ImsearchError):
    """A file that cannot be read as an image (empty, corrupt, truncated, too large, not an image)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotAnImage(BadImage):
    """A file in none of the accepted formats (pixels.FORMATS), or no image at all."""


class TooManyPixels(BadImage):
    """An image over a pixel cap, refused before it is decoded (a decompression bomb, or simply too large)."""


class ModelMismatch(ImsearchError):
    """The stored rows were embedded by another model or preprocessing than the one in use."""


class WeightsUnavailable(ImsearchError):
    """The model weights cannot be loaded (no network, missing or broken file)."""


class DatabaseUnavailable(ImsearchError):
    """The database cannot be reached, or refuses the connection."""


class ServerCrashed(DatabaseUnavailable):
    """A server process died by a signal while running imsearch's statement; retrying would crash it again."""


class SchemaOutdated(ImsearchError):
    """The database schema is older (or newer) than this imsearch; `imsearch db upgrade` fixes the former."""


class UnknownClass(ImsearchError):
    """A class mode was asked for, but the query's class is unknown or not stored."""


class NotCalibrated(ImsearchError):
    """The duplicate distance was asked for by name, but the model in use has none (never calibrated, or it cannot
    tell a copy from a neighbour): `imsearch calibrate` says which."""


class TooCostly(TooManyPixels):
    """An image whose header declares a decode far dearer than its pixels (thousands of JPEG scans, millions of
    TIFF strips), refused before it is opened or decoded."""


class RefusedFile(ImsearchError):
    """A file `imsearch load` refuses, whole: a missing column, a bad value (named by its 0-based row), another
    model. Nothing of the load is stored."""

    def __init__(self, path: str, reason: str, row: int | None = None) -> None:
        where = path if row is None else f"{path}, row {row} (0-based)"
        super().__init__(f"{where}: {reason}; nothing was loaded")
        self.path = path
        self.row = row
        self.reason = reason
