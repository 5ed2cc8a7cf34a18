"""imsearch ingest --ray: decode and embed on a Ray cluster (here a local one of 2 CPUs, shared by the module), the
driver writing what comes back. The same rows as a plain ingest, the same summary, bad and unreadable files named
once, part files that `imsearch load` takes, unchanged files skipped; and a plain ingest never imports ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from tests.conftest import ROOT, copy_photos, scratch_database

if os.environ.get("CI"):
    import ray  # scripts/setup installs the ray extra: in CI these tests run, never skip
else:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

ROWS = "SELECT path, class, sha256, width, height, bytes, model, phash::text, embedding::text FROM images ORDER BY path"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local Ray cluster of 2 CPUs for the module; `--ray auto` and `--ray local` join it, as this process is
    connected already. Its workers inherit the test home (IMSEARCH_HOME), so they share the ONNX export cache."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """The 20 room photos and one file that is no image, for the tests that only read them."""
    photos = copy_photos(tmp_path_factory.mktemp("ray-library") / "photos", 4)
    (photos / "kitchen" / "broken.jpg").write_bytes(b"not a jpeg")
    return photos


@pytest.fixture(scope="module")
def plain(library, server_url, weights):
    """`library` stored by a plain ingest: its --json summary and its rows, what the Ray runs are compared with."""
    from click.testing import CliRunner

    from imsearch.cli import cli

    with scratch_database(server_url, f"imsearch_test_ray_plain_{os.getpid()}") as url:
        done = CliRunner().invoke(cli, ["--database-url", url, "ingest", str(library), "--json"],
                                  env={"IMSEARCH_WEIGHTS": weights}, catch_exceptions=False)
        yield summary(done), rows(url)


def rows(url: str) -> dict[str, tuple]:
    with psycopg.connect(url) as conn:
        return {r[0]: r[1:] for r in conn.execute(ROWS).fetchall()}


def vector(text: str) -> np.ndarray:
    return np.array(text.strip("[]").split(","), np.float64)


def assert_same_library(got: dict[str, tuple], want: dict[str, tuple]) -> None:
    """Every column the same, and each vector at cosine >= 0.9999 of the other's."""
    assert got.keys() == want.keys()
    for path, row in got.items():
        assert row[:-1] == want[path][:-1], path
        a, b = vector(row[-1]), vector(want[path][-1])
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.9999, path


def summary(result) -> dict:
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_ray_ingest_stores_what_a_plain_ingest_stores_and_names_a_bad_file_once(run, library, plain, database_url):
    done = run("ingest", str(library), "--ray", "local", "--json")
    on_ray = summary(done)
    assert done.exit_code == 1  # a file was not stored, as with a plain ingest
    assert_same_library(rows(database_url), plain[1])
    assert {k: v for k, v in on_ray.items() if k != "seconds"} == {k: v for k, v in plain[0].items() if k != "seconds"}
    assert on_ray["added"] == 20
    broken = str(library.resolve() / "kitchen" / "broken.jpg")
    assert on_ray["failed"] == [{"path": broken, "error": "not an image (unknown or unsupported format)"}]
    assert done.stderr.count("broken.jpg") == 1


def test_a_second_ray_ingest_skips_unchanged_files_and_embeds_a_changed_one(run, photos, database_url):
    assert summary(run("ingest", str(photos), "--ray", "auto", "--json"))["added"] == 20
    before = rows(database_url)
    changed = sorted((photos / "bedroom").glob("*.jpg"))[0]
    changed.write_bytes(sorted((photos / "kitchen").glob("*.jpg"))[0].read_bytes())
    again = summary(run("ingest", str(photos), "--ray", "auto", "--json"))
    assert (again["added"], again["updated"], again["skipped"], again["failed"]) == (0, 1, 19, [])
    after = rows(database_url)
    assert {p for p in after if after[p] != before[p]} == {str(changed.resolve())}


@pytest.mark.parametrize("ray_address", ["auto", None], ids=["ray", "this-process"])
def test_to_parquet_writes_parts_that_load_into_the_same_library(run, library, plain, database_url, tmp_path,
                                                                ray_address):
    parts = tmp_path / "parts"
    args = ["ingest", str(library), "--to-parquet", str(parts), "--json"]
    written = summary(run(*args, *(["--ray", ray_address] if ray_address else [])))
    assert (written["added"], written["failed"]) == (20, plain[0]["failed"])
    with psycopg.connect(database_url) as conn:  # no database was touched: not even migrated
        assert conn.execute("SELECT to_regclass('images')").fetchone() == (None,)
    files = sorted(str(p) for p in parts.glob("*.parquet"))
    assert [Path(f).name for f in files] == ["part-00000.parquet"]
    loaded = run("load", *files, "--json")
    assert loaded.exit_code == 0, loaded.output
    assert json.loads(loaded.stdout)["added"] == 20
    assert_same_library(rows(database_url), plain[1])
    again = run(*args)
    assert again.exit_code == 1 and "holds part files already" in again.stderr


def test_a_file_the_workers_cannot_read_is_named_and_the_rest_stored(run, photos, monkeypatch):
    """The driver walked it, then it went (as on a worker without the shared folder): one line names it."""
    import imsearch.ingest

    gone = sorted((photos / "kitchen").glob("*.jpg"))[0]
    walk = imsearch.ingest.walk

    def walk_then_lose_one(*args, **kwargs):
        found = list(walk(*args, **kwargs))
        gone.unlink()
        return iter(found)

    monkeypatch.setattr(imsearch.ingest, "walk", walk_then_lose_one)
    done = run("ingest", str(photos), "--ray", "auto", "--json")
    assert done.exit_code == 1
    result = json.loads(done.stdout)
    assert result["added"] == 19
    [failure] = result["failed"]
    assert failure["path"] == str(gone.resolve())
    assert re.fullmatch(r"not readable on the Ray worker \S+ \(cannot read \(No such file or directory\)\); every "
                        r"worker needs the driver's files at the same path", failure["error"])


def test_a_plain_ingest_never_imports_ray(photos, database_url, weights):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "imsearch", "--database-url", database_url, "ingest", str(photos),
         "--json", "--weights", weights], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["added"] == 20
    imported = re.findall(r"\|\s+([\w.]+)$", done.stderr, re.MULTILINE)
    assert "imsearch.ingest" in imported
    assert not [m for m in imported if m == "ray" or m.startswith("ray.")]


def test_an_actor_whose_model_differs_from_the_drivers_stops_the_job_in_one_line(photos, weights, monkeypatch):
    """A worker with another weights file at the driver's path would store vectors of another model under this
    one's identity: its actor refuses to start, and the driver says why."""
    from imsearch.cluster import RayRunner
    from imsearch.errors import ModelMismatch
    from imsearch.mapper import ModelSpec

    spec = ModelSpec.of(weights, device="cpu")
    monkeypatch.setattr(ModelSpec, "identity", property(lambda self: "resnet50:file-elsewhere:resize256-crop224"))
    files = [(str(p), p.parent.name) for p in sorted(photos.glob("*/*.jpg"))[:2]]
    with pytest.raises(ModelMismatch, match=r"^the model on the Ray worker \S+ is resnet50:file-\w+:resize256-crop224, "
                                            r"not resnet50:file-elsewhere:resize256-crop224 as on the driver"):
        list(RayRunner(spec, "auto").map(files, 32))


def test_a_killed_worker_is_restarted_by_ray_and_every_photo_stored_once(photos, database_url, weights):
    """SIGKILL the actor after the first batch is written: Ray restarts it and runs its batch again; the driver
    writes each path once."""
    import signal

    import psutil

    from imsearch import Imsearch

    killed: list[int] = []

    def kill_the_actor_once(done: int, total: int) -> None:
        if killed:
            return
        for p in psutil.Process().children(recursive=True):  # this module's cluster, started by this process
            with contextlib.suppress(psutil.Error):
                if "MapWorker" in " ".join(p.cmdline()):
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)

    with Imsearch(database_url, weights=weights, device="cpu") as app:
        result = app.ingest(photos, batch_size=4, ray="auto", progress=kill_the_actor_once)
    assert killed
    assert (result.added, result.updated, result.failed) == (20, 0, ())
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT path) FROM images").fetchone() == (20, 20)
