"""Which runtime runs the model: torch, or ONNX Runtime on an export of the same network.

On the CPU, ONNX Runtime embeds 1.5 to 2.3 times as fast as torch (docs/inference.md) and loads without importing
torch, which alone takes a second or more of a cold `imsearch find`. The network is exported with torch once per model
identity, checked against torch on a few synthetic photos (cosine >= MIN_COSINE, else imsearch stays on torch),
and cached in imsearch's data folder with checksums of the checkpoint and of the export, so that a changed
checkpoint or a damaged file is exported again. Both runtimes then give the same vectors under the same identity:
rows stored by one are searched by the other.

`--precision int8` is ONNX Runtime's static quantization of that export, calibrated on the library's own photos;
its vectors differ from fp32's, so its identity says `:int8`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import ImsearchError
from ..settings import home
from ..timing import phase
from .checksums import file_sha256, write_atomically
from .embed import DEVICES, Model, checkpoint_file, get_embedder, model_identity, recipe, resolve_device
from .pixels import DEFAULT_PREPROCESS, Preprocess

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
ONNX_PRECISIONS = ("auto", "fp32", "int8")
# An export is used only when its vectors are torch's to this cosine on every check photo: then they can share
# rows with torch's under one identity. (Measured: >= 0.9999999; docs/inference.md.)
MIN_COSINE = 0.9999
# Below this cosine to fp32, int8 is reported as lossy (it is opt-in either way; docs/inference.md).
INT8_MIN_COSINE = 0.995
CHECK_PHOTOS = 4
CALIBRATION_PHOTOS = 64
# Bumped when the exported graph or its inputs change: older exports are then made again.
EXPORT_FORMAT = 1
OPSET = 17
INPUT, OUTPUT = "pixels", "features"

Calibration = Callable[[int], np.ndarray]


class ExportRejected(ImsearchError):
    """ONNX Runtime's vectors from an export do not match torch's closely enough to share their rows."""


def models_dir() -> Path:
    """Where exports are cached: `models/` in imsearch's data folder."""
    return home() / "models"


def cpu_threads() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cuda_possible() -> bool:
    """Whether CUDA could be there at all, without importing torch: torch.cuda needs NVIDIA's driver, whose files
    Linux shows (WSL: /dev/dxg). Elsewhere than Linux and macOS, torch is asked."""
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")
                or bool(glob.glob("/dev/nvidia[0-9]*")))
    return True


def resolve_backend(backend: str, device: str, precision: str) -> tuple[str, str]:
    """(runtime, device). `auto` is ONNX Runtime on the CPU and torch on CUDA, and torch for bf16/fp16, which
    ONNX Runtime's CPU provider lacks; on a machine without NVIDIA's driver this imports no torch."""
    if backend not in BACKENDS:
        raise ImsearchError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ImsearchError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    onnx_precision = precision in ONNX_PRECISIONS
    if backend == "onnx" or precision == "int8":
        if backend == "torch":
            raise ImsearchError("--precision int8 runs on ONNX Runtime only: use --backend onnx (or auto)")
        if device == "cuda":
            raise ImsearchError("ONNX Runtime runs on the CPU here: use --backend torch with --device cuda"
                                if backend == "onnx" else "--precision int8 runs on the CPU: use --device cpu")
        if not onnx_precision:
            raise ImsearchError(f"--precision {precision} runs on torch only: use --backend torch (or auto)")
        return "onnx", "cpu"
    if backend == "torch" or not onnx_precision:
        return "torch", resolve_device(device)
    if device == "cuda" or (device == "auto" and cuda_possible() and resolve_device("auto") == "cuda"):
        return "torch", resolve_device("cuda")
    return "onnx", "cpu"


class OnnxEmbedder:
    """The exported network in ONNX Runtime: uint8 N x H x W x 3 in, float32 N x 2048 out, as embed.Embedder."""

    backend = "onnx"
    device = "cpu"

    def __init__(self, session: Any, *, weights: str, identity: str, prep: Preprocess, precision: str,
                 threads: int) -> None:
        self.session = session
        self.weights = weights
        self.identity = identity
        self.prep = prep
        self.precision = precision
        self.threads = threads

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 array N x H x W x 3 -> float32 N x 2048 (not normalised, as torch's)."""
        if batch.ndim == 3:
            batch = batch[None]
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, dtype=np.uint8)})[0]


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


# -- the cache -----------------------------------------------------------------------------------------------


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


# -- export and checks ---------------------------------------------------------------------------------------


def check_photos(prep: Preprocess, n: int = CHECK_PHOTOS) -> np.ndarray:
    """A few seeded photo-like images (smooth colour fields, edges, grain) cut as `prep` cuts photos: what both
    runtimes embed before an export is trusted. Synthetic, so no photo needs to be at hand."""
    from PIL import Image

    from .pixels import prepare

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (3 + 2 * i, 4 + 2 * i, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((640, 480), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-16, 17, smooth.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
        out.append(prepare(img, prep))
    return np.stack(out)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def export_fp32(weights: str, prep: Preprocess, identity: str, checkpoint: str) -> Export:
    """Export the network with torch and embed the check photos with both runtimes."""
    import torch

    from .embed import Embedder
    from .resnet import Pixels

    with phase("torch model for the export"):
        reference = Embedder(weights, device="cpu", precision="fp32", prep=prep)
    graph = Pixels(reference.model, reference._mean, reference._std).eval()
    photos = check_photos(prep)
    with phase("onnx export"), torch.inference_mode(), warnings.catch_warnings(), \
            tempfile.TemporaryDirectory(prefix="imsearch-export-") as tmp:
        # The TorchScript exporter is deprecated for the torch.export one, which needs onnxscript; this graph is
        # plain convolutions, which the older exporter handles and tests/test_backends.py checks.
        warnings.simplefilter("ignore")
        out = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(graph, (torch.from_numpy(photos[:1]),), out, input_names=[INPUT],
                              output_names=[OUTPUT], opset_version=OPSET, dynamo=False,
                              dynamic_axes={INPUT: {0: "batch", 1: "height", 2: "width"}, OUTPUT: {0: "batch"}})
        except (RuntimeError, TypeError, ValueError, ImportError) as exc:  # a torch whose exporter changed
            raise ExportRejected(f"torch {torch.__version__} cannot export {identity} to ONNX "
                                 f"({type(exc).__name__}: {str(exc)[:120]})") from None
        model = out.read_bytes()
    cosine = min_cosine(reference.embed(photos), session(model, cpu_threads()).run([OUTPUT], {INPUT: photos})[0])
    log.info("exported %s to ONNX: cosine to torch %.7f on %d check photos", identity, cosine, len(photos))
    if cosine < MIN_COSINE:
        return Export(identity, checkpoint, cosine, None)
    return Export(identity, checkpoint, cosine, hashlib.sha256(model).hexdigest(), model)


class QuantizerAdvice(logging.Filter):
    """ONNX Runtime's quantizer advises on the root logger (shape pre-processing, which changes nothing for this
    graph: measured); a user of imsearch would read it as imsearch's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


def quantize_int8(fp32: bytes, calibration: np.ndarray, identity: str, checkpoint: str) -> Export:
    """ONNX Runtime's static int8 quantization (QDQ, weights per channel), its activation ranges calibrated on
    `calibration` (the library's own photos); the cosine recorded is to the fp32 export on those photos."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Photos(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 8)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    quiet = QuantizerAdvice()
    logging.getLogger().addFilter(quiet)
    try:
        with phase("int8 quantization"), tempfile.TemporaryDirectory(prefix="imsearch-int8-") as tmp:
            src, dest = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(fp32)
            quantize_static(src, dest, Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            model = dest.read_bytes()
    finally:
        logging.getLogger().removeFilter(quiet)
    full, low = (np.concatenate([s.run([OUTPUT], {INPUT: calibration[i:i + 16]})[0]  # batches: memory stays low
                                 for i in range(0, len(calibration), 16)])
                 for s in (session(fp32, cpu_threads()), session(model, cpu_threads())))
    cosine = min_cosine(full, low)
    log.info("quantized %s to int8 on %d photos: cosine to fp32 %.5f", identity, len(calibration), cosine)
    if cosine < INT8_MIN_COSINE:
        log.warning("int8 vectors of %s are at cosine %.4f of fp32 on the calibration photos (below %s): matches "
                    "may differ from fp32's", identity, cosine, INT8_MIN_COSINE)
    return Export(identity, checkpoint, cosine, hashlib.sha256(model).hexdigest(), model)


def cached_or_exported(weights: str, prep: Preprocess, precision: str, calibration: Calibration | None) -> Export:
    """The export for these weights: the cached one when its record is current, else made now and cached."""
    identity = model_identity(weights, prep, precision)
    checkpoint = checkpoint_file(weights)
    if checkpoint.is_file():
        found = cached_export(identity, file_sha256(checkpoint))
        if found is not None:
            return found
    source = None
    if precision == "int8":  # before the lock, which this process would otherwise take twice
        fp32 = cached_or_exported(weights, prep, "fp32", None)
        if fp32.sha256 is None:
            raise ExportRejected(rejection(fp32))
        source = export_bytes(fp32)
        if source is None:
            forget(fp32)
            return cached_or_exported(weights, prep, precision, calibration)
    with export_lock():
        if not checkpoint.is_file():  # a named checkpoint not downloaded yet: torch fetches it
            get_embedder(weights, device="cpu", precision="fp32", prep=prep)
        digest = file_sha256(checkpoint)
        found = cached_export(identity, digest)  # another process may have made it meanwhile
        if found is not None:
            return found
        if source is not None:
            photos = calibration(CALIBRATION_PHOTOS) if calibration is not None else np.empty((0,))
            if len(photos) == 0:
                raise ImsearchError("--precision int8 is calibrated on the library's own photos, and none are stored "
                                    "yet: ingest at fp32 first, then `imsearch ingest DIR --reembed --precision int8`")
            export = quantize_int8(source, photos, identity, digest)
        else:
            export = export_fp32(weights, prep, identity, digest)
        try:
            save_export(export)
        except OSError as exc:
            log.warning("cannot cache the ONNX export in %s (%s); it is made again next time", models_dir(),
                        exc.strerror or exc)
    return export


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


def rejection(export: Export) -> str:
    return (f"ONNX Runtime's vectors for {export.identity} are at cosine {export.cosine:.7f} of torch's on the "
            f"check photos, below {MIN_COSINE}, so they cannot share rows with torch's")


# -- choosing --------------------------------------------------------------------------------------------------

_models: dict[tuple[Any, ...], Model] = {}
_models_lock = threading.Lock()


def get_model(
    weights: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    prep: Preprocess = DEFAULT_PREPROCESS,
    backend: str = "auto",
    threads: int | None = None,
    calibration: Calibration | None = None,
) -> Model:
    """One model per (weights, device, precision, preprocessing, backend, threads) per process, on the runtime
    `backend` chooses. `auto` falls back to torch, with one warning line, when the export cannot be used;
    `calibration(n)` gives up to n of the library's photos (model input) when an int8 export must be made."""
    key = (str(weights), device, precision, prep.name, backend, threads)
    with _models_lock:
        if key in _models:
            return _models[key]
    with phase("model"):  # a second thread asking meanwhile waits below, and logs its wait after this one
        runtime, resolved = resolve_backend(backend, device, precision)
        if runtime == "torch":
            model = get_embedder(weights, device=resolved, precision=precision, prep=prep)
            with _models_lock:
                return _models.setdefault(key, model)
        prep = recipe(weights) if prep.name == "recipe" else prep
        precision = "fp32" if precision == "auto" else precision
        with _models_lock:
            if key not in _models:
                _models[key] = _onnx(weights, prep, precision, backend, threads, calibration)
            return _models[key]


def _onnx(weights: str, prep: Preprocess, precision: str, backend: str, threads: int | None,
          calibration: Calibration | None) -> Model:
    threads = threads or cpu_threads()
    try:
        for _ in range(2):  # a damaged cached file is exported once more
            export = cached_or_exported(weights, prep, precision, calibration)
            if export.sha256 is None:
                raise ExportRejected(rejection(export))
            built = open_session(export, threads)
            if built is not None:
                return OnnxEmbedder(built, weights=weights, identity=export.identity, prep=prep,
                                    precision=precision, threads=threads)
            forget(export)
        raise ImsearchError(f"the ONNX export in {models_dir()} is damaged again as soon as it is written")
    except ExportRejected as exc:
        if backend != "auto" or precision == "int8":
            raise
        log.warning("%s; staying on torch", exc)
    except ImportError as exc:  # a broken install: onnxruntime is a dependency
        if backend != "auto" or precision == "int8":
            raise ImsearchError(f"ONNX Runtime cannot be imported ({exc}); reinstall imsearch") from None
        log.warning("ONNX Runtime cannot be imported (%s); staying on torch", exc)
    return get_embedder(weights, device="cpu", precision=precision, prep=prep)
