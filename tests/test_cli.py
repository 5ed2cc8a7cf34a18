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


def test_db_index_other_builds_one_index_per_class_and_drop_removes_them(run, photos, monkeypatch, exact_max_rows):
    exact_max_rows(3)  # 16 rows outside each class: worth an index here
    assert run("ingest", str(photos)).exit_code == 0
    built = run("db", "index-other")
    assert built.exit_code == 0 and built.stdout.startswith("built 5 other-class indexes in ")
    assert "5 other-class indexes, " in built.stdout
    assert "mode other through them: recall@5 1.000 against an exact scan" in built.stdout
    monkeypatch.setattr(cli_mod, "OTHER_MIN_RECALL", 1.01)  # what a library whose folds lose neighbours sees
    again = run("db", "index-other")
    assert again.stdout.startswith("built 0 other-class indexes")  # nothing left to build
    assert again.stderr.startswith("warning: below 1.01: on these embeddings the indexes miss neighbours")
    dropped = run("db", "index-other", "--drop")
    assert dropped.exit_code == 0 and dropped.stdout == "0 other-class indexes, 0 MiB\n"


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
