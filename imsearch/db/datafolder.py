"""Files in the embedded server's data folder, as imsearch reads and writes them.

Run by root, the data folder belongs to the server's system user, who may put a link or a FIFO in place of any file
there: root reads and writes its files only through these, which follow no link and wait on no FIFO.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def read_file(path: Path, *, since: int = 0, limit: int = 16 * 2**20) -> bytes | None:
    """Up to `limit` bytes of a regular file from byte `since`; None when it is missing, a link or no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.pread(fd, limit, since)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, owner: Any = None) -> None:
    """Replace `path` with a new file holding `data` (a link there is replaced, never followed), owned by the
    pwd entry `owner` when given: written to a new name, then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL: a new file, mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if owner is not None:
                os.fchown(f.fileno(), owner.pw_uid, owner.pw_gid)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_own_file(path: Path) -> int:
    """A file of this process's user, opened for reading and writing as a plain file of its own: a link, a FIFO or a
    file with other names (a hard link to someone else's) in its place is removed and a new file made."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError:
        fd = -1
    if fd >= 0:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            return fd
        os.close(fd)
    path.unlink(missing_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
