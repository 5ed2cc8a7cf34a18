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

import glob
import hashlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ImsearchError
from ..timing import phase
from .checksums import file_sha256
from .choices import BACKENDS, DEVICES, ONNX_PRECISIONS
from .embed import Model, checkpoint_file, get_embedder, model_identity, recipe, resolve_device
from .exports import (
    MIN_COSINE,
    Export,
    cached_export,
    export_bytes,
    export_lock,
    forget,
    models_dir,
    open_session,
    save_export,
    session,
)
from .pixels import DEFAULT_PREPROCESS, Preprocess

log = logging.getLogger(__name__)

# Below this cosine to fp32, int8 is reported as lossy (it is opt-in either way; docs/inference.md).
INT8_MIN_COSINE = 0.995
CHECK_PHOTOS = 4
CALIBRATION_PHOTOS = 64
OPSET = 17
INPUT, OUTPUT = "pixels", "features"

Calibration = Callable[[int], np.ndarray]


class ExportRejected(ImsearchError):
    """ONNX Runtime's vectors from an export do not match torch's closely enough to share their rows."""


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
