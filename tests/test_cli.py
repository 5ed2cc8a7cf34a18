"""The command line: exit codes, output shapes, one-line errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from imsearch import cli as cli_mod
from imsearch.cli import cli
from imsearch.db.migrate import SCHEMA_REVISION
from imsearch.terminal import RANK_COLUMNS


def test_ingest_json_summary_and_exit_status(run, photos):
    (photos / "kitchen" / "zero.jpg").write_bytes(b"")
    result = run("ingest", str(photos), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert set(summary) >= {"added", "updated", "skipped", "failed", "seconds"}
    assert summary["added"] == 20 and summary["updated"] == 0 and summary["skipped"] == 0
    assert summary["failed"] == [{"path": str((photos / "kitchen" / "zero.jpg").resolve()),
                                  "error": "empty file (0 bytes)"}]
    assert f"{(photos / 'kitchen' / 'zero.jpg').resolve()}: empty file (0 bytes)" in result.stderr
    (photos / "kitchen" / "zero.jpg").unlink()
    again = run("ingest", str(photos))
    assert again.exit_code == 0
    assert again.stdout.startswith("0 added, 0 updated, 20 skipped, 0 failed")


def test_find_prints_the_rank_table(run, photos):
    run("ingest", str(photos))
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    result = run("find", str(query), "--same-class")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split("  ")[0] == "rank"
    for column in RANK_COLUMNS:
        assert column in lines[0]
    body = lines[2:]
    assert len(body) == 3  # 4 kitchen photos stored, the query itself left out
    assert all(" kitchen " in line for line in body)


def test_find_json_shape_for_several_queries(run, photos):
    run("ingest", str(photos))
    queries = [str(sorted(photos.glob(f"{c}/*.jpg"))[0]) for c in ("bedroom", "bathroom")]
    result = run("find", *queries, "--exclude-class", "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)
    assert [i["query"] for i in items] == queries
    for item in items:
        assert item["mode"] == "other"
        assert [m["rank"] for m in item["matches"]] == [1, 2, 3]
        assert set(item["matches"][0]) >= {"rank", "path", "class", "distance"}
        assert all(m["class"] != item["query_class"] for m in item["matches"])


def test_usage_errors_exit_2(run):
    assert run("find").exit_code == 2
    assert run("find", "x.jpg", "-k", "0").exit_code == 2


def test_library_errors_are_one_line_without_traceback(run, photos, tmp_path):
    missing = run("find", str(tmp_path / "missing.jpg"))
    assert missing.exit_code == 1
    assert missing.stderr.strip() == f"Error: {tmp_path / 'missing.jpg'}: cannot read (No such file or directory)"
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    bad = run("find", str(text))
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.stderr.strip() == f"Error: {text}: not an image (unknown or unsupported format)"


def test_unreachable_database_is_one_line(weights, tmp_path):
    result = CliRunner().invoke(cli, ["--database-url", "postgresql://nobody:secret@127.0.0.1:9/none",
                                      "find", "x.jpg"], env={"IMSEARCH_WEIGHTS": weights})
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "cannot connect to postgresql://nobody:***@127.0.0.1:9/none" in line
    assert "secret" not in line


def test_weights_that_cannot_be_downloaded_say_how_to_fix_it(run, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torch.hub

    def offline(url, *args, **kwargs):
        raise OSError(f"<urlopen error [Errno -2] Name or service not known> ({url})")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    result = run("find", str(sorted(photos.glob("*/*.jpg"))[0]), "--weights", "IMAGENET1K_V1")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert "cannot download ResNet-50 weights IMAGENET1K_V1" in line
    assert "resnet50-0676ba61.pth" in line and "--weights FILE.pth" in line


def test_db_url_prints_the_connection_uri(run, database_url):
    result = run("db", "url")
    assert result.stdout.strip() == database_url


def test_db_upgrade_reports_the_revision(run):
    result = run("db", "upgrade")
    assert result.exit_code == 0 and f"schema at revision {SCHEMA_REVISION}" in result.stdout


def test_db_check_recall_prints_each_modes_recall_and_warns_below_the_bar(run, photos, monkeypatch, exact_max_rows):
    exact_max_rows(3)  # the filtered modes go through the whole-table index, not an exact scan
    assert run("ingest", str(photos)).exit_code == 0
    measured = run("db", "check-recall", "--json")
    assert measured.exit_code == 0 and measured.stderr == ""
    assert json.loads(measured.stdout) == {"all": 1.0, "same": 1.0, "other": 1.0}  # 20 rows: the index finds all
    shown = run("db", "check-recall", "--sample", "3")
    assert shown.exit_code == 0 and shown.stderr == ""
    assert shown.stdout == "all    recall@5 1.000\nsame   recall@5 1.000\nother  recall@5 1.000\n"
    monkeypatch.setattr(cli_mod, "MIN_RECALL", 1.01)  # what a library whose folds lose neighbours sees
    low = run("db", "check-recall")
    assert low.exit_code == 0
    assert low.stderr.startswith("warning: mode all, same, other below 1.01 against an exact scan; ")
    assert "imsearch.rerank_depth" in low.stderr and "--exact" in low.stderr
    assert run("db", "check-recall", "--sample", "0").exit_code == 2


def test_db_index_other_is_a_hidden_no_op_now(run, photos, database_url, exact_max_rows):
    import psycopg

    def layout() -> list[tuple[str, str]]:
        with psycopg.connect(database_url) as conn:
            return conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'images' "
                                "ORDER BY 1").fetchall()

    exact_max_rows(3)  # 16 rows outside each class: once worth an other-class index
    assert run("ingest", str(photos)).exit_code == 0
    before = layout()
    assert "images_fold_hnsw" in dict(before)
    for args in ((), ("--drop",)):
        result = run("db", "index-other", *args)
        assert result.exit_code == 0 and result.stderr == ""
        assert result.stdout.startswith("nothing to do: mode other searches indexes that hold every row already")
        assert layout() == before
    assert "index-other" not in run("db", "--help").stdout and "check-recall" in run("db", "--help").stdout


def test_find_on_a_fifo_fails_at_once_naming_it(run, photos, database_url, weights, tmp_path):
    """A FIFO nobody writes to would hold `find` forever at open(): it is refused before it is read."""
    import os
    import subprocess
    import sys

    run("ingest", str(photos))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    env = {**os.environ, "DATABASE_URL": database_url, "IMSEARCH_WEIGHTS": weights}
    done = subprocess.run([sys.executable, "-m", "imsearch", "find", str(fifo), "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"Error: {fifo}: not a regular file\n"


def test_db_upgrade_and_find_debug_say_when_the_indexes_outgrow_the_buffer_cache(weights, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import psycopg

    from imsearch.db import embedded

    from .conftest import copy_photos

    photos = copy_photos(tmp_path / "photos", 4)
    with embedded.temporary() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '128kB'")  # PostgreSQL's least: 16 pages
            pgdata = Path(conn.execute("SHOW data_directory").fetchone()[0])
        embedded.stop(pgdata)
        url = embedded.start(pgdata, tune=False)

        def imsearch(*args: str):
            return CliRunner().invoke(cli, ["--database-url", url, *args], env={"IMSEARCH_WEIGHTS": weights},
                                      catch_exceptions=False)

        assert imsearch("ingest", str(photos)).exit_code == 0
        with psycopg.connect(url, autocommit=True) as conn:
            # 20 rows' fold index fits 16 pages; with an index per class (as in a library of a few large classes
            # among many small ones) they no longer do
            for cls in ("bathroom", "bedroom", "dining_room", "kitchen", "living_room"):
                conn.execute("SELECT imsearch_index_class(%s)", (cls,))
            hnsw = conn.execute("SELECT sum(pg_relation_size(indexrelid)) FROM pg_index x JOIN pg_class c "
                                "ON c.oid = x.indexrelid JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'hnsw'")
            assert hnsw.fetchone()[0] > 128 * 1024
        upgraded = imsearch("db", "upgrade")
        assert upgraded.exit_code == 0, upgraded.output
        assert "note: the HNSW indexes take" in upgraded.stderr and "shared_buffers (128 kB)" in upgraded.stderr
        assert "shared_buffers = '64MB'" in upgraded.stderr
        query = next((photos / "kitchen").glob("*.jpg"))
        for debug in ([], ["--debug"]):
            found = subprocess.run([sys.executable, "-m", "imsearch", "--database-url", url, *debug, "find",
                                    str(query)], env={**os.environ, "IMSEARCH_WEIGHTS": weights},
                                   capture_output=True, text=True, timeout=300)
            assert found.returncode == 0, found.stderr
            assert ("the HNSW indexes take" in found.stderr) == bool(debug)
