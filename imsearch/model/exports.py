"""The ONNX exports cached in imsearch's data folder: each export and its record (checkpoint, ONNX Runtime, cosine
to the reference, checksum), this machine's optimized copy, and the lock their writers take. What is exported, and
when a cached export is trusted, is imsearch.model.runtimes's."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..settings import home
from ..timing import phase
from .checksums import write_atomically

log = logging.getLogger(__name__)

# An export is used only when its vectors are torch's to this cosine on every check photo: then they can share
# rows with torch's under one identity. (Measured: >= 0.9999999; docs/inference.md.)
MIN_COSINE = 0.9999
# Bumped when the exported graph or its inputs change: older exports are then made again.
EXPORT_FORMAT = 1


def models_dir() -> Path:
    """Where exports are cached: `models/` in imsearch's data folder."""
    return home() / "models"


def session(model: bytes, threads: int, *, optimized: bool = False, save: Path | None = None) -> Any:
    """An ONNX Runtime session on the CPU with `threads` threads for each operator.

    Its threads block rather than spin between operators: during ingest the decoding threads need those cores
    (bench/ingest.py measures the split). An `optimized` model (saved by an earlier session to `save`) is not
    optimized again: that is most of a session's start.
    """
    with phase("import onnxruntime"):
        import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # its warnings are about graph rewrites, not about imsearch's results
    if optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save is not None:
        options.optimized_model_filepath = str(save)
    with phase("onnxruntime session"):
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def machine() -> str:
    """What an optimized model is specific to: ONNX Runtime lays tensors out for this CPU's vector units."""
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    text = f"{platform.machine()} {platform.processor()} {' '.join(sorted(flags.split()))} {onnxruntime_version()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Export:
    """An export and what it was checked against: the checkpoint's sha256 and the cosine to the reference (torch's
    fp32 vectors; for int8, ONNX Runtime's fp32 export). `sha256` is None for a rejected export; `model` holds the
    bytes of one just made (a cached one is read when its session opens)."""

    identity: str
    checkpoint: str
    cosine: float
    sha256: str | None
    model: bytes | None = None


def paths(identity: str, kind: str = "") -> tuple[Path, Path]:
    """A model file and its record, named after the identity; kind "optimized" is this machine's copy."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", identity) + (f".{kind}" if kind else "")
    return models_dir() / f"{stem}.onnx", models_dir() / f"{stem}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); making it again", path, exc)
        return None
    return record if isinstance(record, dict) else None


def cached_export(identity: str, checkpoint: str) -> Export | None:
    """The cached export's record for this identity and checkpoint; None when there is none or it is stale (another
    checkpoint, ONNX Runtime or export format). The file itself is checked when its session opens."""
    record = read_record(paths(identity)[1])
    if record is None:
        return None
    wanted = {"identity": identity, "checkpoint_sha256": checkpoint, "format": EXPORT_FORMAT,
              "onnxruntime": onnxruntime_version()}
    if any(record.get(k) != v for k, v in wanted.items()):
        log.info("%s: made for another checkpoint or ONNX Runtime; exporting the model again", paths(identity)[1])
        return None
    return Export(identity, checkpoint, float(record["cosine"]), record.get("export_sha256"))


def save_export(export: Export) -> None:
    """Write the export, then its record, each atomically and readable by this user only. A reader sees a whole
    old record or a whole new one; one that finds the export not matching the record makes it again."""
    model_path, record_path = paths(export.identity)
    record: dict[str, Any] = {
        "identity": export.identity, "checkpoint_sha256": export.checkpoint, "format": EXPORT_FORMAT,
        "onnxruntime": onnxruntime_version(), "cosine": export.cosine, "min_cosine": MIN_COSINE,
        "export_sha256": export.sha256, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if export.model is not None:
        write_atomically(model_path, export.model)
    write_atomically(record_path, (json.dumps(record, indent=2) + "\n").encode())


def forget(export: Export) -> None:
    """Drop a damaged export's record, unless another process has replaced it meanwhile."""
    with export_lock():
        record_path = paths(export.identity)[1]
        record = read_record(record_path)
        if record is not None and record.get("export_sha256") == export.sha256:
            record_path.unlink(missing_ok=True)


@contextlib.contextmanager
def export_lock() -> Iterator[None]:
    """One writer at a time per data folder: a second process waits, then finds the first one's files. Model files
    are written only under this lock, so half-written ones found here were left by a killed process."""
    folder = models_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with os.fdopen(os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            for left in folder.glob(".optimizing-*"):
                shutil.rmtree(left, ignore_errors=True)
            for left in folder.glob(".*.onnx.*.tmp"):
                left.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def checked_session(model: bytes, sha256: str | None, threads: int, *, optimized: bool = False,
                    save: Path | None = None) -> Any | None:
    """A session on `model`, None when its bytes do not have this checksum. The hash runs in a thread (hashlib
    releases the GIL) while ONNX Runtime builds the session, so on two cores the check costs little time."""
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(model).hexdigest()))
    hasher.start()
    try:
        built = session(model, threads, optimized=optimized, save=save)
    except RuntimeError:  # ONNX Runtime's errors on a file it cannot parse
        hasher.join()
        if digest[0] != sha256:
            return None
        raise
    hasher.join()
    return built if digest[0] == sha256 else None


def open_session(export: Export, threads: int) -> Any | None:
    """A session on the export: through this machine's optimized copy when it is current and whole, else on the
    export itself, checked against its checksum while ONNX Runtime optimizes it, whose result is kept for the
    next start. None when the cached export is damaged."""
    fast_path, fast_record_path = paths(export.identity, "optimized")
    here = machine()
    fast = read_record(fast_record_path)
    if fast is not None and fast.get("export_sha256") == export.sha256 and fast.get("machine") == here:
        with phase("optimized model"):
            data = read_bytes(fast_path)
            built = None if data is None else checked_session(data, fast.get("sha256"), threads, optimized=True)
        if built is not None:
            return built
        log.warning("%s: damaged (its checksum differs from the one recorded); optimizing the model again",
                    fast_path)
    model_path = paths(export.identity)[0]
    data = export.model if export.model is not None else read_bytes(model_path)
    if data is None:
        return None
    with export_lock(), tempfile.TemporaryDirectory(dir=models_dir(), prefix=".optimizing-") as tmp:
        out = Path(tmp) / "model.onnx"
        built = checked_session(data, export.sha256, threads, save=out)
        if built is None:
            log.warning("%s: damaged (its checksum differs from the one recorded); exporting the model again",
                        model_path)
            return None
        try:
            optimized = out.read_bytes()
            write_atomically(fast_path, optimized)
            record = {"identity": export.identity, "export_sha256": export.sha256, "machine": here,
                      "sha256": hashlib.sha256(optimized).hexdigest()}
            write_atomically(fast_record_path, (json.dumps(record, indent=2) + "\n").encode())
        except OSError as exc:
            log.warning("cannot keep the optimized model in %s (%s); it is made again next time", models_dir(),
                        exc.strerror or exc)
    return built


def read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s: unreadable (%s); making it again", path, exc.strerror or exc)
        return None


def export_bytes(export: Export) -> bytes | None:
    """The export's bytes, None when the cached file is missing or damaged."""
    if export.model is not None:
        return export.model
    data = read_bytes(paths(export.identity)[0])
    if data is None or hashlib.sha256(data).hexdigest() != export.sha256:
        log.warning("%s: damaged (its checksum differs from the one recorded); exporting the model again",
                    paths(export.identity)[0])
        return None
    return data
