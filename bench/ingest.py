"""Ingest speed and memory: imsearch ingest on each runtime against the model alone, and how decoding and the model
share the cores.

    .venv/bin/python bench/ingest.py                      # 300 large JPEGs, CPU: torch and ONNX Runtime
    .venv/bin/python bench/ingest.py --rounds 3           # each figure three times, interleaved; medians
    .venv/bin/python bench/ingest.py --split              # also ONNX Runtime ingest at other thread splits
    .venv/bin/python bench/ingest.py --photos 1000        # the memory check: peak RSS for 1,000 12 MP photos
    .venv/bin/python bench/ingest.py --device cuda        # torch on CUDA (ONNX Runtime runs on the CPU only)

Makes its own 4032x3024 JPEGs (quality 90) upscaled from ../shared/datasets/rooms, uses a throwaway embedded
PostgreSQL (or DATABASE_URL, where it creates and drops a database), a throwaway data folder for the ONNX export,
and the stand-in weights unless --weights is given. In one run it prints: model-only throughput of torch and of
ONNX Runtime (random pixels, same batch), decoding alone on one thread, the ceiling that decoding on the same
cores leaves for ingest, `imsearch ingest` end to end with each backend (a subprocess each, so its peak RSS is its
own), their ratios, and the seed-style loop (one image at a time, full decode, 1028x768, one INSERT each).
Figures taken while other programs run are noisy: compare the ratios of one run. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from synthetic import bench_server, drop_database, fresh_database

from imsearch.db.connect import connect
from imsearch.db.migrate import upgrade
from imsearch.db.store import Store
from imsearch.ingest import default_workers, ingest
from imsearch.model import pixels
from imsearch.model.embed import get_embedder
from imsearch.model.runtimes import cpu_threads, get_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"


def make_photos(folder: Path, n: int) -> list[Path]:
    """n large JPEGs in class folders, made once per folder (reused when already there)."""
    sources = sorted((ROOMS / "base").glob("*/*.jpg")) + sorted((ROOMS / "test").glob("*/*.jpg"))
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        dest = folder / src.parent.name / f"{src.stem}_{i:04d}.jpg"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            img = Image.open(src).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
            if i >= len(sources):  # later copies differ in content, so no two files hash alike
                img = img.rotate(180 * (i // len(sources) % 2)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.save(dest, "JPEG", quality=90)
        out.append(dest)
    return out


def model_only(model, batch: int, n: int) -> float:
    """Images/s of the model alone on random pixels: the ceiling for ingest."""
    data = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    model.embed(data)  # warm-up
    done, t = 0, time.perf_counter()
    while done < n:
        model.embed(data)
        done += batch
    return done / (time.perf_counter() - t)


def decode_only(files: list[Path]) -> float:
    """Images/s of reading and decoding (draft mode, resize, crop) on one thread."""
    t = time.perf_counter()
    for f in files:
        pixels.load(f.read_bytes(), str(f))
    return len(files) / (time.perf_counter() - t)


def empty_library(admin_url: str, name: str) -> str:
    """A new database with imsearch's schema."""
    url = fresh_database(admin_url, name)
    upgrade(url)
    return url


def imsearch_ingest(folder: Path, url: str, weights: str, backend: str, args: argparse.Namespace) -> tuple[dict, float]:
    """`imsearch ingest --json` as a subprocess: its summary and its own peak RSS in MiB."""
    cmd = [sys.executable, "-m", "imsearch", "--database-url", url, "ingest", str(folder), "--json",
           "--weights", weights, "--backend", backend, "--device", args.device,
           "--batch-size", str(args.batch_size)] + (["--workers", str(args.workers)] if args.workers else [])
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 1):
        sys.exit(f"imsearch ingest --backend {backend} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout), int(proc.stderr.strip().splitlines()[-1]) / 1024


# Runs a command and prints its peak RSS (KiB) last on stderr. A child forked from this process, which holds the
# models, would report this process's RSS as its own peak (Linux counts the memory it was forked from), so a
# small launcher forks it instead, as /usr/bin/time does.
PEAK_RSS = """import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def seed_loop(files: list[Path], url: str, weights: str) -> float:
    """The seed study's way: one image at a time, full decode, 1028x768, fp32 torch, one INSERT each."""
    import torch

    embedder = get_embedder(weights, device="cpu", precision="fp32")
    mean = torch.tensor(pixels.MEAN).view(3, 1, 1)
    std = torch.tensor(pixels.STD).view(3, 1, 1)
    conn = connect(url)
    conn.execute("CREATE TEMP TABLE seed (path text, embedding halfvec(2048))")
    t = time.perf_counter()
    for f in files:
        img = Image.open(f).convert("RGB").resize((1028, 768))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255).sub(mean).div(std)
        with torch.inference_mode():
            v = embedder.model(x[None])[0].numpy()
        conn.execute("INSERT INTO seed VALUES (%s, %s::halfvec)", (str(f), str(v.tolist())))
    rate = len(files) / (time.perf_counter() - t)
    conn.close()
    return rate


def split(folder: Path, url: str, weights: str, n: int) -> None:
    """ONNX Runtime ingest in this process at other (decoding threads, model threads) splits."""
    cores = cpu_threads()
    print(f"\nthread split, ONNX Runtime, in this process (default: {default_workers()} decoding, {cores} model):")
    print("decoding  model  ingest img/s  model-only img/s  ratio")
    for workers, threads in sorted({(1, cores), (default_workers(), cores), (2 * cores, cores),
                                    (max(1, cores - 1), max(1, cores - 1)), (cores, 1)}):
        model = get_model(weights, device="cpu", backend="onnx", threads=threads)
        ceiling = model_only(model, 32, n)
        store = Store.open(empty_library(url, "imsearch_bench_split"))
        try:
            result = ingest(store, model, folder, workers=workers)
        finally:
            store.close()
        rate = result.added / result.seconds
        print(f"{workers:8d}  {threads:5d}  {rate:12.1f}  {ceiling:16.1f}  {rate / ceiling:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=300, help="large JPEGs to ingest")
    ap.add_argument("--seed-photos", type=int, default=30, help="photos for the (slow) seed-style loop")
    ap.add_argument("--weights", help="weights name or file [default: a stand-in written by ../shared/tools]")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--rounds", type=int, default=1, help="repeat each measurement, interleaved; print medians")
    ap.add_argument("--split", action="store_true", help="also ingest at other thread splits (ONNX Runtime)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "imsearch-bench-jpegs"),
                    help="where the large JPEGs are kept between runs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="imsearch-bench-") as tmp:
        # -- a data folder of its own for the ONNX export; weights and photos
        os.environ["IMSEARCH_HOME"] = str(Path(tmp) / "home")
        weights = args.weights
        if weights is None:
            weights = str(Path(tmp) / "standin.pth")
            subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), weights],
                           check=True, capture_output=True)
        cache = Path(args.cache) / "photos"
        t = time.perf_counter()
        files = make_photos(cache, args.photos)
        print(f"{len(files)} JPEGs 4032x3024 q90 in {cache} ({time.perf_counter() - t:.0f} s to make); "
              f"weights {weights}; device {args.device}, batch {args.batch_size}, {cpu_threads()} CPUs, "
              f"{args.rounds} round(s)")
        folder = Path(tmp) / "photos"  # exactly these files, linked from the cache
        for f in files:
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            (folder / f.parent.name / f.name).symlink_to(f)

        # -- a database: DATABASE_URL, else a throwaway embedded server
        with bench_server() as url:
            run(args, weights, files, folder, url)


def run(args: argparse.Namespace, weights: str, files: list[Path], folder: Path, url: str) -> None:
    """Every measurement, on the server at `url`; prints as it goes."""
    backends = ["torch"] if args.device == "cuda" else ["torch", "onnx"]
    models = {"torch": get_embedder(weights, device=args.device, precision="fp32")}
    if "onnx" in backends:
        t = time.perf_counter()
        models["onnx"] = get_model(weights, device="cpu", backend="onnx")  # exported here, cached for ingest
        print(f"ONNX export made and checked in {time.perf_counter() - t:.1f} s")
    figures: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            # -- the ceilings: each model alone, then decoding alone
            for backend in backends:
                figures.setdefault(f"model {backend}", []).append(
                    model_only(models[backend], args.batch_size, max(96, len(files) // 2)))
            figures.setdefault("decode", []).append(decode_only(files[:40]))
            # -- imsearch ingest, end to end, in its own process, on each backend
            for backend in backends:
                library = empty_library(url, "imsearch_bench_ingest")
                summary, rss = imsearch_ingest(folder, library, weights, backend, args)
                stored = summary["added"] + summary["updated"]
                figures.setdefault(f"ingest {backend}", []).append(stored / summary["seconds"])
                figures.setdefault(f"rss {backend}", []).append(rss)
        med = {k: statistics.median(v) for k, v in figures.items()}
        cores = cpu_threads()
        print(f"model only, torch (random pixels):        {med['model torch']:6.1f} img/s")
        if "onnx" in backends:
            print(f"model only, ONNX Runtime:                 {med['model onnx']:6.1f} img/s  "
                  f"({med['model onnx'] / med['model torch']:.2f}x torch)")
        print(f"decoding alone, one thread:               {med['decode']:6.1f} img/s")
        for backend in backends:
            model, rate = med[f"model {backend}"], med[f"ingest {backend}"]
            # the most an ingest can do when decoding takes its share of the same cores
            ceiling = cores / (cores / model + 1 / med["decode"])
            print(f"imsearch ingest --backend {backend:5s}:         {rate:6.1f} img/s  = {rate / model:.2f} x its "
                  f"model-only; decoding leaves {ceiling:.1f} ({ceiling / model:.2f} x); "
                  f"peak RSS {med[f'rss {backend}']:,.0f} MiB")
        if "onnx" in backends:
            print(f"ingest onnx / ingest torch:               {med['ingest onnx'] / med['ingest torch']:6.2f}")
        if args.rounds > 1:
            for k, v in figures.items():
                print(f"  {k}: " + ", ".join(f"{x:.1f}" for x in v))
        if args.split and "onnx" in backends:
            split(folder, url, weights, max(96, len(files) // 2))
        # -- the seed study's loop, on a subset
        seed = seed_loop(files[: args.seed_photos], empty_library(url, "imsearch_bench_ingest"), weights)
        best = med["ingest onnx" if "onnx" in backends else "ingest torch"]
        print(f"\nseed-style loop ({args.seed_photos} photos):    {seed:6.1f} img/s; imsearch ingest is "
              f"{best:.1f}, {best / seed:.1f}x")
    finally:
        for name in ("imsearch_bench_ingest", "imsearch_bench_split"):
            drop_database(url, name)


if __name__ == "__main__":
    main()
