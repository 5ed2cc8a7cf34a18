"""File checksums, kept in imsearch's data folder, and the atomic writes of what is kept there.

The model identity and the export check both need the sha256 of a 100 MB checkpoint, which takes a tenth of a
second or more to read and hash: a cold `imsearch find` would spend it every time. So a checksum is kept, keyed by
what changes whenever the file's contents do: device, inode, size, modification time and change time (which no
user can set; git trusts the same fields). A file changed in the last seconds is hashed every time, since a second
change within one timestamp would go unnoticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from ..settings import home

log = logging.getLogger(__name__)

KEPT = 32  # checksums kept, the most recent
RECENT_SECONDS = 2.0

_known: dict[str, str] = {}
_lock = threading.Lock()


def record_file() -> Path:
    return home() / "models" / "checksums.json"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's contents, hashed once while the file stays as it is."""
    st = path.stat()
    key = "|".join(map(str, (path.resolve(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
    with _lock:
        if key in _known:
            return _known[key]
    kept = _read()
    digest = kept.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
        if time.time() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > RECENT_SECONDS:
            kept.pop(key, None)
            kept[key] = digest
            _write(dict(list(kept.items())[-KEPT:]))
    with _lock:
        _known[key] = digest
    return digest


def _read() -> dict[str, str]:
    try:
        kept = json.loads(record_file().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in kept.items() if isinstance(v, str)} if isinstance(kept, dict) else {}


def _write(kept: dict[str, str]) -> None:
    try:
        record_file().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(record_file(), (json.dumps(kept, indent=1) + "\n").encode())
    except OSError as exc:  # a read-only data folder: hashed again next time
        log.debug("cannot keep checksums in %s: %s", record_file(), exc)


def write_atomically(path: Path, data: bytes) -> None:
    """A temporary file in the same folder (mode 0600), synced, then renamed over `path`: a reader sees the old file
    or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
