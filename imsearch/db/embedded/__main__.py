"""The watcher: python -m imsearch.db.embedded watch PGDATA (started by EmbeddedServer.start)."""

import sys
from pathlib import Path

from .lifecycle import EmbeddedServer

if len(sys.argv) == 3 and sys.argv[1] == "watch":
    EmbeddedServer(Path(sys.argv[2])).watch()
else:
    sys.exit("usage: python -m imsearch.db.embedded watch PGDATA")
