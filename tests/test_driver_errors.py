"""Driver errors are translated at the db/ boundary: a dropped connection in the audit and the calibration reads as
it does in `find` ("<doing> URL failed: <the server's line>", exit 1), and nothing outside imsearch/db/ catches or
names a psycopg exception."""

from __future__ import annotations

import ast
import importlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from imsearch.db.connect import redact
from imsearch.errors import DatabaseUnavailable

PACKAGE = Path(__file__).resolve().parent.parent / "imsearch"
TERMINATED = "terminating connection due to administrator command"


def _psycopg_exceptions(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every psycopg exception class a module names, through `psycopg.X`, `psycopg.errors.X`
    or `from psycopg[.errors] import X`."""
    found = []
    for node in ast.walk(tree):
        dotted: list[str] = []
        if isinstance(node, ast.Attribute):
            part: ast.expr = node
            while isinstance(part, ast.Attribute):
                dotted.insert(0, part.attr)
                part = part.value
            if not (isinstance(part, ast.Name) and part.id == "psycopg"):
                continue
            names = [("psycopg." + ".".join(dotted[:-1])).rstrip("."), dotted[-1]]
            candidates = [(names[0], names[1])]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "psycopg":
            candidates = [(node.module or "", a.name) for a in node.names]
        else:
            continue
        for module, name in candidates:
            try:
                value = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
            if isinstance(value, type) and issubclass(value, BaseException):
                found.append((node.lineno, f"{module}.{name}"))
    return found


def test_nothing_outside_db_catches_or_names_a_psycopg_exception():
    outside = [p for p in sorted(PACKAGE.rglob("*.py")) if "db" not in p.relative_to(PACKAGE).parts[:1]]
    named = {str(p.relative_to(PACKAGE.parent)): hits for p in outside
             if (hits := _psycopg_exceptions(ast.parse(p.read_text(encoding="utf-8"))))}
    assert named == {}
    inside = _psycopg_exceptions(ast.parse((PACKAGE / "db" / "errors.py").read_text(encoding="utf-8")))
    assert inside, "the check sees the translator's own catches"


@contextmanager
def terminated_when_it_writes(url: str, table: str) -> Iterator[list[int]]:
    """Hold a SHARE lock on `table` (reads pass, writes wait) and terminate the first backend that waits for it;
    yields the list of terminated pids, filled once it happened."""
    killed: list[int] = []
    stop = threading.Event()
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as admin:
        holder.execute(f"LOCK TABLE {table} IN SHARE MODE")

        def watch() -> None:
            while not stop.is_set() and not killed:
                row = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND "
                                    "wait_event_type = 'Lock' AND pid <> pg_backend_pid() LIMIT 1").fetchone()
                if row is not None and admin.execute("SELECT pg_terminate_backend(%s, 10000)", row).fetchone()[0]:
                    killed.append(row[0])
                    holder.rollback()
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield killed
        finally:
            stop.set()
            watcher.join()


def _line(doing: str, url: str) -> str:
    return f"Error: {doing} {redact(url)} failed: {TERMINATED}"


def test_find_names_a_dropped_connection_in_the_line_the_audit_uses(stored):
    """The wording the other tests expect is find's own (Store.lost, as the search uses it)."""
    exc = psycopg.OperationalError(TERMINATED + "\nserver closed the connection unexpectedly")
    assert str(stored.store.lost(exc, "searching")) == _line("searching", stored.store.url)[len("Error: "):]


def test_a_connection_dropped_in_the_audit_is_one_line_and_exit_1(stored, run, database_url, tmp_path):
    with terminated_when_it_writes(database_url, "image_audit") as killed:
        result = run("audit", "--out", str(tmp_path / "report"), "--json")
    assert killed, "the audit wrote its findings without waiting"
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == _line("auditing", database_url)
    assert "unexpected" not in result.output and "Traceback" not in result.output


def test_a_connection_dropped_in_the_calibration_is_one_line_and_exit_1(stored, run, database_url):
    with terminated_when_it_writes(database_url, "model_calibration") as killed:
        result = run("calibrate", "--sample", "5")
    assert killed, "the calibration was stored without waiting"
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == _line("calibrating with", database_url)
    assert "unexpected" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("step", ["audit", "calibrate"])
def test_a_connection_dropped_mid_pass_reads_as_in_find(stored, server_url, database_url, step):
    """The backend is terminated while the pass runs (from its progress callback): the next statement fails."""
    def terminate(done: int, total: int) -> None:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (stored.store.backend_pid,))

    with pytest.raises(DatabaseUnavailable) as lost:
        if step == "audit":
            stored.calibrate(sample=5)
            stored.audit(progress=terminate)
        else:
            stored.calibrate(sample=5, progress=terminate)
    doing = "auditing" if step == "audit" else "calibrating with"
    # the model's loading checks the store, whose facade replaces the dropped connection: the pass then finds its
    # own connection closed rather than terminated
    expected = _line(doing, database_url)[len("Error: "):]
    assert str(lost.value) in (expected, expected.replace(TERMINATED, "the connection is closed"))
