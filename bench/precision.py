"""Does reduced precision keep the vectors? bf16 (or fp16 on CUDA) on torch, int8 on ONNX Runtime, against fp32 on
the same runtime, on the shared room photos.

    .venv/bin/python bench/precision.py                       # bf16 on the CPU, stand-in weights
    .venv/bin/python bench/precision.py --precision int8      # ONNX Runtime int8, calibrated on the base photos
    .venv/bin/python bench/precision.py --precision fp16 --device cuda --weights IMAGENET1K_V1

Prints the speed of both, the cosine similarity of each photo's reduced-precision vector to its fp32 vector (min
and mean) and how often a test photo's top 5 among the base photos is the same set in both. int8's activation
ranges are calibrated on 64 of the base photos (the library, as `imsearch ingest --precision int8` calibrates on
the stored photos), in a throwaway data folder. imsearch keeps fp32 as its default unless the mean is >= 0.999 and
the top 5 agree. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imsearch.model import pixels
from imsearch.model.embed import Embedder, Model
from imsearch.model.runtimes import CALIBRATION_PHOTOS, get_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"


def load(files: list[Path]) -> np.ndarray:
    return np.stack([pixels.load(f.read_bytes(), str(f)).pixels for f in files])


def models(weights: str, device: str, precision: str, base: list[Path]) -> tuple[Model, Model]:
    """(fp32, reduced) on the runtime the reduced precision runs on."""
    if precision == "int8":
        def calibration(n: int) -> np.ndarray:
            return load(base[:: max(1, len(base) // n)][:n])

        return (get_model(weights, device="cpu", backend="onnx"),
                get_model(weights, device="cpu", precision="int8", backend="onnx", calibration=calibration))
    return (Embedder(weights, device=device, precision="fp32"),
            Embedder(weights, device=device, precision=precision))


def embed_all(embedder: Model, files: list[Path], batch: int = 32) -> tuple[np.ndarray, float]:
    arrays = list(load(files))
    embedder.embed(np.stack(arrays[:batch]))  # warm-up
    t = time.perf_counter()
    out = np.concatenate([embedder.embed(np.stack(arrays[i:i + batch])) for i in range(0, len(arrays), batch)])
    return out / np.linalg.norm(out, axis=1, keepdims=True), len(files) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "int8"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMSEARCH_HOME"] = str(Path(tmp) / "home")  # the exports, int8's calibration, stay out of yours
        # -- weights: as given, else the stand-in
        weights = args.weights
        if weights is None:
            weights = str(Path(tmp) / "standin.pth")
            subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), weights],
                           check=True, capture_output=True)
        base = sorted((ROOMS / "base").glob("*/*.jpg"))
        test = sorted((ROOMS / "test").glob("*/*.jpg"))
        # -- the same photos at both precisions
        reference, reduced = models(weights, args.device, args.precision, base)
        full, full_rate = embed_all(reference, base + test)
        low, low_rate = embed_all(reduced, base + test)
    cos = np.sum(full * low, axis=1)
    top = []
    for vecs in (full, low):
        sims = vecs[len(base):] @ vecs[: len(base)].T
        top.append([set(np.argsort(-row)[:5]) for row in sims])
    same = np.mean([a == b for a, b in zip(*top)])
    overlap = np.mean([len(a & b) / 5 for a, b in zip(*top)])
    print(f"weights {weights}, {reduced.backend} on {args.device}, {len(base) + len(test)} photos"
          + (f", int8 calibrated on {CALIBRATION_PHOTOS} of the base photos" if args.precision == "int8" else ""))
    print(f"fp32: {full_rate:.1f} img/s   {args.precision}: {low_rate:.1f} img/s   ({low_rate / full_rate:.2f}x)")
    print(f"cosine({args.precision}, fp32): min {cos.min():.5f}  mean {cos.mean():.5f}")
    print(f"top-5 of {len(test)} test photos among {len(base)} base: identical sets {same:.0%}, "
          f"overlap {overlap:.3f}")


if __name__ == "__main__":
    main()
