"""Runtimes: ONNX Runtime and torch give interchangeable vectors under one identity; the cached export is current,
whole and private; a cold find imports no torch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imsearch.errors import ImsearchError
from imsearch.model import checksums, embed, exports, pixels, runtimes
from imsearch.model import choices as choices_module
from imsearch.model.embed import Embedder
from imsearch.model.exports import models_dir, paths
from imsearch.model.runtimes import OnnxEmbedder, get_model
from tests.conftest import CLASSES, ROOMS, copy_photos


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty export cache in a data folder of its own, and no model loaded yet in this process."""
    monkeypatch.setenv("IMSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(runtimes, "_models", {})
    monkeypatch.setattr(embed, "_cache", {})
    return tmp_path


def reload_models(monkeypatch) -> None:
    """As a new process would: nothing loaded, everything read from the cache."""
    monkeypatch.setattr(runtimes, "_models", {})
    monkeypatch.setattr(embed, "_cache", {})


def test_vectors_of_both_runtimes_are_interchangeable_under_one_identity(database_url, weights):
    from imsearch import Imsearch

    test = sorted(ROOMS.glob("test/*/*.jpg"))
    with Imsearch(database_url, weights=weights, backend="onnx") as onnx, \
            Imsearch(database_url, weights=weights, backend="torch") as torch_app:
        assert isinstance(onnx.embedder, OnnxEmbedder) and isinstance(torch_app.embedder, Embedder)
        assert onnx.embedder.identity == torch_app.embedder.identity
        by_onnx, by_torch = [], []
        for i in range(0, len(test), 25):
            by_onnx += onnx.embed(test[i:i + 25])
            by_torch += torch_app.embed(test[i:i + 25])
        cos = cosines(np.stack([e.vector for e in by_onnx]), np.stack([e.vector for e in by_torch]))
        assert cos.min() >= 0.9999

        # rows stored by ONNX Runtime, searched with torch's vectors and with ONNX Runtime's: the same top 5
        result = onnx.ingest(ROOMS / "test")
        assert result.added == len(test) and not result.failed
        for e_onnx, e_torch in zip(by_onnx, by_torch):
            from_torch = torch_app.search(e_torch, "all", k=5, include_self=True)
            from_onnx = onnx.search(e_onnx, "all", k=5, include_self=True)
            assert {m.id for m in from_torch.matches} == {m.id for m in from_onnx.matches}
            assert from_torch.matches[0].path == from_onnx.matches[0].path == str(Path(e_torch.name).resolve())


def test_export_is_cached_once_per_identity_privately(fresh, weights, monkeypatch):
    model = get_model(weights, device="cpu")
    assert isinstance(model, OnnxEmbedder)
    export, record = paths(model.identity)
    optimized, optimized_record = paths(model.identity, "optimized")
    for path in (export, record, optimized, optimized_record):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(models_dir().stat().st_mode) == 0o700
    assert not [p.name for p in models_dir().iterdir() if p.name.endswith(".tmp") or p.name.startswith(".optim")]

    reload_models(monkeypatch)
    before = export.stat().st_mtime_ns
    again = get_model(weights, device="cpu")
    assert isinstance(again, OnnxEmbedder) and export.stat().st_mtime_ns == before  # read, not made again

    # what a process killed while writing leaves is removed by the next writer
    (models_dir() / ".optimizing-killed").mkdir()
    (models_dir() / f".{export.name}.killed.tmp").write_bytes(b"half")
    with exports.export_lock():
        assert sorted(p.name for p in models_dir().iterdir() if p.name.startswith(".")) == [".lock"]


def test_a_changed_checkpoint_never_reuses_a_stale_export(fresh, weights, other_weights, monkeypatch):
    # torchvision's name for the weights, its checkpoint in torch.hub's folder: the identity stays the same
    monkeypatch.setenv("TORCH_HOME", str(fresh / "torch"))
    hub = fresh / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(weights, hub / "resnet50-0676ba61.pth")
    photos = runtimes.check_photos(pixels.DEFAULT_PREPROCESS)
    first = get_model("IMAGENET1K_V1", device="cpu").embed(photos)

    shutil.copy(other_weights, hub / "resnet50-0676ba61.pth")
    reload_models(monkeypatch)
    second = get_model("IMAGENET1K_V1", device="cpu")
    assert isinstance(second, OnnxEmbedder)
    assert second.identity == "resnet50:IMAGENET1K_V1:resize256-crop224"
    reference = Embedder("IMAGENET1K_V1", device="cpu").embed(photos)
    assert cosines(second.embed(photos), reference).min() >= 0.9999
    assert cosines(first, reference).max() < 0.9999  # the stale export would have given other vectors

    # a weights file: another file is another identity, so another export
    reload_models(monkeypatch)
    assert get_model(other_weights, device="cpu").identity != get_model(weights, device="cpu").identity
    assert len(list(models_dir().glob("*.optimized.onnx"))) == 3


def test_a_damaged_export_is_detected_and_made_again(fresh, weights, monkeypatch, caplog):
    photos = runtimes.check_photos(pixels.DEFAULT_PREPROCESS)
    expected = get_model(weights, device="cpu").embed(photos)
    identity = embed.model_identity(weights)
    export, optimized = paths(identity)[0], paths(identity, "optimized")[0]

    def damage(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # inside the weights: still a valid ONNX file
        path.write_bytes(bytes(data))

    # this machine's optimized copy: made again from the export
    damage(optimized)
    reload_models(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="imsearch.model.exports"):
        again = get_model(weights, device="cpu")
    assert "optimized.onnx: damaged" in caplog.text
    assert np.allclose(again.embed(photos), expected, atol=1e-4)

    # the export itself (with no optimized copy to start from): exported again
    damage(export)
    optimized.unlink()
    caplog.clear()
    reload_models(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="imsearch.model.exports"):
        again = get_model(weights, device="cpu")
    assert f"{export.name}: damaged" in caplog.text
    assert np.allclose(again.embed(photos), expected, atol=1e-4)
    assert exports.cached_export(identity, checksums.file_sha256(embed.checkpoint_file(weights))) is not None


def test_an_export_that_differs_from_torch_is_not_used(fresh, weights, monkeypatch, caplog):
    monkeypatch.setattr(runtimes, "MIN_COSINE", 1.5)  # no export can reach it
    with caplog.at_level(logging.WARNING, logger="imsearch.model.runtimes"):
        model = get_model(weights, device="cpu")
    assert isinstance(model, Embedder)
    [line] = caplog.messages
    assert "below 1.5" in line and line.endswith("staying on torch")
    with pytest.raises(runtimes.ExportRejected, match="cannot share rows with torch's"):
        get_model(weights, device="cpu", backend="onnx")
    assert not paths(model.identity)[0].exists()  # the verdict is kept, so the next start does not export again


def test_auto_is_onnx_runtime_on_the_cpu_and_torch_otherwise(monkeypatch):
    monkeypatch.setattr(runtimes, "cuda_possible", lambda: False)
    assert runtimes.resolve_backend("auto", "auto", "auto") == ("onnx", "cpu")
    assert runtimes.resolve_backend("auto", "cpu", "int8") == ("onnx", "cpu")
    assert runtimes.resolve_backend("auto", "cpu", "bf16") == ("torch", "cpu")  # ONNX Runtime's CPU has no bf16
    assert runtimes.resolve_backend("torch", "auto", "fp32") == ("torch", "cpu")
    for backend, device, precision, message in [
        ("onnx", "cuda", "auto", "ONNX Runtime runs on the CPU"),
        ("onnx", "cpu", "bf16", "runs on torch only"),
        ("torch", "cpu", "int8", "runs on ONNX Runtime only"),
        ("tensorrt", "cpu", "auto", "unknown backend"),
    ]:
        with pytest.raises(ImsearchError, match=message):
            runtimes.resolve_backend(backend, device, precision)


def test_cli_choices_are_the_librarys():
    from imsearch.cli import find

    choices = {p.name: list(p.type.choices) for p in find.params if hasattr(p.type, "choices")}
    assert choices["backend"] == list(runtimes.BACKENDS)
    assert choices["device"] == list(embed.DEVICES)
    assert choices["precision"] == list(embed.PRECISIONS)
    assert choices["preprocess"] == list(pixels.PREPROCESSING)
    assert (choices["backend"], choices["device"], choices["precision"], choices["preprocess"]) == (
        list(choices_module.BACKENDS), list(choices_module.DEVICES), list(choices_module.PRECISIONS),
        list(choices_module.PREPROCESSINGS))
    assert set(runtimes.ONNX_PRECISIONS) <= set(embed.PRECISIONS)


def test_cold_help_imports_neither_numpy_nor_pil_nor_torch():
    """The choice lists come from imsearch.model.choices, which imports nothing: `imsearch --help` stays fast."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "imsearch", "find", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "imsearch.model.choices" in imported
    assert not {m for m in imported if m.split(".")[0] in ("numpy", "PIL", "torch", "psycopg")}


def test_torch_hub_folder_is_found_without_torch(monkeypatch, tmp_path):
    import torch

    for env in ({}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"TORCH_HOME": str(tmp_path / "th")}):
        for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert embed.torch_hub_dir() == Path(torch.hub.get_dir())


def test_cold_find_imports_no_torch_once_the_export_is_cached(database_url, weights, tmp_path):
    from imsearch import Imsearch

    photos = copy_photos(tmp_path / "photos", 2)
    with Imsearch(database_url, weights=weights) as app:
        assert app.ingest(photos).added == 2 * len(CLASSES)  # and the export is made
    query = sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0]
    env = {**os.environ, "IMSEARCH_WEIGHTS": weights}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "imsearch", "--database-url", database_url,
                           "find", str(query), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported
    assert not {m for m in imported if m == "torch" or m.startswith(("torch.", "torchvision"))}
    assert '"rank": 5' in proc.stdout


def test_int8_is_its_own_model_calibrated_on_the_stored_photos(fresh, database_url, weights, photos):
    from imsearch import Imsearch

    with Imsearch(database_url, weights=weights, precision="int8") as int8:
        with pytest.raises(ImsearchError, match="ingest at fp32 first"):
            _ = int8.embedder  # nothing stored to calibrate on
        with Imsearch(database_url, weights=weights) as fp32:
            fp32.ingest(photos)
            model = int8.embedder
            assert model.identity == fp32.embedder.identity + ":int8" and model.backend == "onnx"
            queries = sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[:4]
            low, full = int8.embed(queries), fp32.embed(queries)
        assert cosines(np.stack([e.vector for e in low]), np.stack([e.vector for e in full])).min() > 0.95
        with pytest.raises(ImsearchError, match="embedded with .*crop224, but this ingest uses .*:int8"):
            int8.ingest(photos)  # never mixed with fp32 rows
        assert int8.ingest(photos, reembed=True).updated == 20


def test_a_checkpoints_checksum_is_kept_until_the_file_changes(fresh, monkeypatch):
    monkeypatch.setattr(checksums, "RECENT_SECONDS", -1.0)  # this file is new: kept at once all the same
    monkeypatch.setattr(checksums, "_known", {})
    path = fresh / "weights.pth"
    path.write_bytes(b"weights")
    digest = checksums.file_sha256(path)
    assert stat.S_IMODE(checksums.record_file().stat().st_mode) == 0o600

    kept = json.loads(checksums.record_file().read_text())
    assert list(kept.values()) == [digest]
    checksums.record_file().write_text(json.dumps(dict.fromkeys(kept, "0" * 64)))
    monkeypatch.setattr(checksums, "_known", {})  # as a new process
    assert checksums.file_sha256(path) == "0" * 64  # read from the record, not hashed

    path.write_bytes(b"other weights")
    assert checksums.file_sha256(path) == hashlib.sha256(b"other weights").hexdigest()


def test_a_torch_that_cannot_export_leaves_auto_on_torch(fresh, weights, monkeypatch, caplog):
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("exporter removed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.WARNING, logger="imsearch.model.runtimes"):
        assert isinstance(get_model(weights, device="cpu"), Embedder)
    assert "cannot export" in caplog.text and "exporter removed" in caplog.text
