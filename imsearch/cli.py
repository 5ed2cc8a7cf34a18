"""The `imsearch` command: parses options, calls the library, prints results, turns errors into one line."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click

from .errors import ImsearchError
from .model.choices import BACKENDS, DEVICES, PRECISIONS, PREPROCESSINGS
from .modes import MAX_K, MODES
from .settings import LOCK_TIMEOUT
from .timing import phase, since_process_start

log = logging.getLogger("imsearch")


class Group(click.Group):
    """Every library error becomes one line and exit 1; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with phase("command"):
                return super().invoke(ctx)
        except ImsearchError as exc:
            if ctx.meta.get("imsearch.debug"):
                raise
            raise click.ClickException(one_line(str(exc))) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the last net: one line instead of a traceback
            if ctx.meta.get("imsearch.debug"):
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {one_line(str(exc))} (run with --debug for the traceback)"
            ) from None


def one_line(text: str) -> str:
    """A message on one line: drivers put details on further lines."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _app(ctx: click.Context, weights: str | None = None, device: str = "auto", precision: str = "auto",
         preprocess: str = "recipe", backend: str | None = None) -> Any:
    with phase("imports"):
        from .api import Imsearch

    app = Imsearch(ctx.obj["database_url"], weights=weights, device=device, precision=precision,
                   preprocess=preprocess, backend=backend)
    ctx.call_on_close(app.close)
    return app


weights_option = click.option(
    "--weights", envvar="IMSEARCH_WEIGHTS", metavar="NAME|FILE",
    help="torchvision ResNet50_Weights name (default IMAGENET1K_V1) or a local .pth file [env IMSEARCH_WEIGHTS].",
)
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto",
                             show_default=True, help="Where the model runs; auto picks CUDA when available.")
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="Model precision; auto is fp32. int8 runs on ONNX Runtime, calibrated on stored photos (docs/inference.md).",
)
backend_option = click.option(
    "--backend", type=click.Choice(BACKENDS), envvar="IMSEARCH_BACKEND", default="auto",
    show_default=True,
    help="Model runtime: auto is ONNX Runtime on the CPU (faster, and no torch import once exported) and torch on "
         "CUDA; both give the same vectors (docs/inference.md) [env IMSEARCH_BACKEND].",
)
preprocess_option = click.option(
    "--preprocess", type=click.Choice(PREPROCESSINGS), default="recipe", show_default=True,
    help="How photos are cut for the model: torchvision's recipe (resize 256, centre-crop 224), the whole frame "
         "at 224x224, or the seed study's whole frame at 1028x768 (see docs/evaluation.md).",
)
MODEL_OPTIONS = ("weights", "device", "precision", "preprocess", "backend")


def model_options(command: Any) -> Any:
    """The model's options, the same on every command that embeds; the command gets them as one dict, `model`."""

    @functools.wraps(command)
    def with_model(*args: Any, **kwargs: Any) -> Any:
        return command(*args, model={name: kwargs.pop(name) for name in MODEL_OPTIONS}, **kwargs)

    for option in (backend_option, preprocess_option, precision_option, device_option, weights_option):
        with_model = option(with_model)
    return with_model


@click.group(cls=Group)
@click.option("--database-url", envvar="DATABASE_URL", metavar="URL",
              help="PostgreSQL with pgvector [env DATABASE_URL]; default: the embedded server under IMSEARCH_HOME.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="imsearch")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, debug: bool) -> None:
    """Content-based image search on PostgreSQL + pgvector (ResNet-50 features, cosine distance)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="imsearch: %(message)s",
                        stream=sys.stderr)
    if not debug:  # the driver's own warnings (e.g. on a connection lost mid-pipeline) repeat imsearch's one line
        logging.getLogger("psycopg").setLevel(logging.ERROR)
    ctx.meta["imsearch.debug"] = debug
    ctx.obj = {"database_url": database_url}
    started = since_process_start()
    if started is not None:
        log.debug("timing: start-up %.3f s", started)


@contextlib.contextmanager
def progress_bar(what: str, *, shown: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback drawing a bar with images/s on a terminal's stderr (silent elsewhere)."""
    bar = None
    drawn = shown and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and drawn:  # drawn from the first step: a stage that never runs shows no empty bar
            from tqdm import tqdm

            bar = tqdm(total=total, unit="img", desc=what, file=sys.stderr, dynamic_ncols=True)
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def index_builds() -> Iterator[Callable[[str, int, int], None]]:
    """A `progress(index, rows done, rows)` callback drawing one bar per index being built (silent off a terminal)."""
    bars: dict[str, contextlib.ExitStack] = {}
    callbacks: dict[str, Callable[[int, int], None]] = {}
    lock = threading.Lock()

    def progress(index: str, done: int, total: int) -> None:
        with lock:
            if index not in callbacks:
                bars[index] = contextlib.ExitStack()
                callbacks[index] = bars[index].enter_context(progress_bar(f"building {index}"))
            callbacks[index](done, max(total, done))

    try:
        yield progress
    finally:
        for stack in bars.values():
            stack.close()


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@model_options
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Images per model batch and per database transaction.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Decoding threads [default: from the CPU count].")
@click.option("--prune", is_flag=True, help="Delete rows of files under FOLDER that no longer exist.")
@click.option("--reembed", is_flag=True, help="Re-embed rows stored with another model, in place.")
@click.option("--ray", "ray", metavar="ADDRESS",
              help="Decode and embed on a Ray cluster: auto joins the running one, local starts one for the job, or "
                   "an address (ray://head:10001, head:6379). Needs imsearch[ray]; workers must see FOLDER at the "
                   "same path (docs/scaling.md).")
@click.option("--to-parquet", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write every image's row to part files in DIR for `imsearch load` instead of the library (no "
                   "database is used).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def ingest(ctx: click.Context, folder: Path, model: dict[str, Any], batch_size: int, workers: int | None, prune: bool,
           reembed: bool, ray: str | None, to_parquet: Path | None, as_json: bool) -> None:
    """Embed and store every image under FOLDER (class = first-level sub-folder).

    Unchanged files are skipped, changed ones re-embedded. Exit 1 when some files could not be stored.
    """
    if to_parquet is not None and (prune or reembed):
        raise click.UsageError("--to-parquet writes part files, not the library: it takes no --prune or --reembed")
    app = _app(ctx, **model)
    stop = threading.Event()

    def interrupt(*_: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C stops at once; committed batches stay stored
        stop.set()  # the first lets the current batch finish and prints the summary

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with progress_bar("ingest", shown=not as_json) as progress:
            result = app.ingest(folder, batch_size=batch_size, workers=workers, prune=prune, reembed=reembed,
                                progress=progress, stop=stop, ray=ray, to_parquet=to_parquet)
    finally:
        signal.signal(signal.SIGINT, previous)
    from .files import printable

    for failure in result.failed:
        click.echo(f"{printable(failure.path)}: {failure.error}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        rate = (result.added + result.updated) / result.seconds if result.seconds else 0.0
        click.echo(
            f"{result.added} added, {result.updated} updated, {result.skipped} skipped, "
            f"{len(result.failed)} failed in {result.seconds:.1f} s ({rate:.1f} img/s)"
            + (f" to part files in {to_parquet}: `imsearch load {to_parquet}/*.parquet` stores them"
               if to_parquet is not None else "")
            + (" (interrupted: re-run to finish)" if result.interrupted else "")
        )
        if result.moved or result.reclassified:
            click.echo(f"{result.moved} moved, {result.reclassified} reclassified (their rows and vectors kept)")
        if result.missing and not prune:
            click.echo(f"{len(result.missing)} stored file(s) under {folder} no longer exist; "
                       "`--prune` removes them", err=True)
        elif result.pruned:
            click.echo(f"pruned {result.pruned} row(s) of vanished files")
    if result.kept_classes and not as_json:
        click.echo(f"kept the classes given by an ingest of a parent folder ({result.kept_classes} photo(s)); "
                   "ingest that folder to change them", err=True)
    if result.failed or result.interrupted:
        ctx.exit(1)


@cli.command()
@click.option("--dry-run", is_flag=True, help="List the rows that would be dropped; drop nothing.")
@click.option("--gone-roots", is_flag=True,
              help="Also drop the rows of an ingest folder none of whose photos remain (deleted, not unmounted).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def prune(ctx: click.Context, dry_run: bool, gone_roots: bool, as_json: bool) -> None:
    """Drop the rows of photos whose files are gone, anywhere in the library.

    A file that exists but cannot be read is kept. An ingest folder none of whose photos remain (a drive not
    mounted looks the same) is named and kept unless --gone-roots; ingesting a moved folder moves its rows instead.
    """
    from .files import printable

    result = _app(ctx).prune(dry_run=dry_run, gone_roots=gone_roots)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    for root, rows in result.refused:
        click.echo(f"{printable(root)}: none of its {rows} stored photo(s) remain (a drive not mounted?); kept, "
                   "`--gone-roots` drops them", err=True)
    if dry_run:
        for path in result.missing:
            click.echo(f"would drop {printable(path)}")
        click.echo(f"{len(result.missing)} row(s) of vanished files would be dropped (dry run)")
    else:
        click.echo(f"pruned {result.pruned} row(s) of vanished files")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.parquet")
@click.option("--model", metavar="ID", help="The model identity to export, for a library holding several.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def export(ctx: click.Context, file: Path, model: str | None, as_json: bool) -> None:
    """Write the library to a Parquet file: path, class, sha256, sizes, phash and the embedding (float32), with the
    model identity in the file's metadata (docs/bulk.md). No model loads."""
    with progress_bar("export", shown=not as_json) as progress:
        result = _app(ctx).export(file, model=model, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"exported {result.rows} row(s) to {result.file} in {result.seconds:.1f} s")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path),
                metavar="FILE.parquet...")
@click.option("--model", metavar="ID",
              help="The model identity of files without imsearch:model metadata (imsearch export writes it).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def load(ctx: click.Context, files: tuple[Path, ...], model: str | None, as_json: bool) -> None:
    """Store the rows of Parquet files (as imsearch export writes them), all or nothing; no model loads.

    A new path is added, a stored one whose bytes, class or vector differ is updated, the same row skipped. A file
    with a bad value, a missing column or another model is refused in one line naming it and the row (docs/bulk.md).
    """
    with progress_bar("load", shown=not as_json) as progress:
        result = _app(ctx).load(files, model=model, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"{result.added} added, {result.updated} updated, {result.skipped} skipped in "
                   f"{result.seconds:.1f} s")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-k", "--top", "k", type=click.IntRange(1, MAX_K), default=5, show_default=True,
              help="How many matches per query.")
@click.option("--same-class", "mode", flag_value="same", help="Only images of the query's class.")
@click.option("--exclude-class", "mode", flag_value="other", help="Only images of other classes.")
@click.option("--mode", "mode", type=click.Choice(MODES), default="all", show_default=True,
              help="all, same (as --same-class) or other (as --exclude-class).")
@click.option("--class", "query_class", metavar="NAME",
              help="The query's class [default: of a stored copy, else its folder's name].")
@click.option("--include-self", is_flag=True, help="Keep stored images with the query's exact content.")
@click.option("--exact", is_flag=True, help="Exact scan instead of the HNSW index.")
@click.option("--max-distance", metavar="D",
              help="Drop the matches farther than cosine distance D (0 to 2) from the query, after ranking, so "
                   "fewer than K may be shown; `duplicate` is the duplicate distance calibrated for the model.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one item per query.")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Also write a picture of the query beside its ranked matches (one IMAGE only).")
@model_options
@click.pass_context
def find(ctx: click.Context, images: tuple[Path, ...], k: int, mode: str, query_class: str | None,
         include_self: bool, exact: bool, max_distance: str | None, as_json: bool, grid: Path | None,
         model: dict[str, Any]) -> None:
    """Print the K stored images closest to each IMAGE by cosine distance."""
    from .terminal import RANK_COLUMNS, rank_rows, table

    if grid is not None and len(images) != 1:
        raise click.UsageError("--grid draws one query: give exactly one IMAGE")
    app = _app(ctx, **model)
    results = app.find(list(images), mode, k=k, query_class=query_class, include_self=include_self, exact=exact,
                       max_distance=max_distance)
    if grid is not None:
        from .evaluation.pictures import grid as draw_grid

        r = results[0]
        try:
            draw_grid(images[0], r.query_class, r.matches, mode=r.mode).save(grid, format="PNG")
        except OSError as exc:
            raise click.ClickException(f"cannot write {grid}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=2))
        return
    rows = [row for r in results for row in rank_rows(r)]
    click.echo(table(RANK_COLUMNS, rows))
    for r in results:
        if len(r.matches) < k:
            within = f" within --max-distance {max_distance}" if max_distance is not None else ""
            click.echo(f"{r.query}: only {len(r.matches)} stored image(s) match mode {r.mode}{within}", err=True)


@cli.command()
@click.argument("testdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--mode", "modes", multiple=True, type=click.Choice(MODES),
              help="A mode to evaluate; repeat for several [default: all three].")
@click.option("-k", "--top", "k", type=click.IntRange(1, MAX_K), default=5, show_default=True,
              help="How many matches per query are scored.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("imsearch-report"),
              show_default=True, help="Folder for summary.json, the CSVs, the grids and report.html.")
@click.option("--no-grids", is_flag=True, help="Skip the grid pictures (faster on large test folders).")
@click.option("--brief", is_flag=True, help="Print only the figures, not the rank table of every query.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json to stdout instead of the tables.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Query images per model batch.")
@click.option("--exact", is_flag=True, help="Exact scans instead of the HNSW index.")
@model_options
@click.pass_context
def evaluate(ctx: click.Context, testdir: Path, modes: tuple[str, ...], k: int, out: Path, no_grids: bool,
             brief: bool, as_json: bool, batch_size: int, exact: bool, model: dict[str, Any]) -> None:
    """Search every image under TESTDIR (class = sub-folder) in each mode, score the matches, write a report.

    Prints the rank table per class and the figures: precision@k, precision@1, average precision@k and the
    correspondence share in mode all, the mean distance in mode same, the class correspondence in mode other.
    """
    from .evaluation.report import text, write

    app = _app(ctx, **model)
    with progress_bar("evaluate", shown=not as_json) as progress:
        evaluation = app.evaluate(testdir, modes or MODES, k=k, batch_size=batch_size,
                                  exact=exact, progress=progress)
    try:
        written = write(evaluation, out, grids=not no_grids)
    except OSError as exc:
        raise click.ClickException(f"cannot write the report in {out}: {exc.strerror or exc}") from None
    for cls, n in sorted(evaluation.unstored.items()):
        click.echo(f"{testdir / cls}: class {cls!r} is not stored; its {n} image(s) are left out", err=True)
    for path, reason in evaluation.skipped:
        click.echo(f"{path}: {reason}", err=True)
    if as_json:
        click.echo(json.dumps(evaluation.to_json(), indent=2))
        return
    click.echo(text(evaluation, ranks=not brief))
    click.echo(f"\nreport: {out / 'report.html'} ({len(written.grids)} grids; "
               f"{evaluation.seconds:.1f} s to embed and search)")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-upload-mb", type=click.IntRange(1, 1024), default=20, show_default=True,
              help="Largest upload accepted, in MB (larger ones get 413).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A host name the page answers to besides loopback and the address it is reached on (repeat it; "
                   "default: IMSEARCH_ALLOWED_HOSTS). Requests naming any other host get 400.")
@click.option("--allowed-origin", "allowed_origins", multiple=True, metavar="ORIGIN",
              help="A site whose pages may send requests to this one, as scheme://host[:port] (repeat it; default: "
                   "IMSEARCH_ALLOWED_ORIGINS). Other cross-site requests get 403.")
@click.option("--header-timeout", type=click.FloatRange(0.1, 3600), default=10, show_default=True,
              metavar="SECONDS", help="How long a request's headers may take to arrive (then 408).")
@click.option("--body-timeout", type=click.FloatRange(0.1, 3600), default=60, show_default=True, metavar="SECONDS",
              help="How long a request's body (the upload) may take to arrive after its headers (then 408).")
@click.option("--keep-alive", type=click.IntRange(1, 3600), default=5, show_default=True, metavar="SECONDS",
              help="How long an idle connection stays open after an answer.")
@click.option("--max-connections", type=click.IntRange(8, 100_000), default=1000, show_default=True, metavar="N",
              help="Connections open at once, lowered to fit the open-file limit; beyond it a new connection "
                   "displaces the one that has waited longest for a request.")
@model_options
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, max_upload_mb: int, allowed_hosts: tuple[str, ...],
          allowed_origins: tuple[str, ...], header_timeout: float, body_timeout: float, keep_alive: int,
          max_connections: int, model: dict[str, Any]) -> None:
    """Serve the search page and its JSON API (model loaded once, shared by every request)."""
    try:
        from .web import create_app
        from .web.server import Limits, serve_app
    except ImportError as exc:
        raise click.ClickException(f"the web page needs the web extra ({exc}); pip install 'imsearch[web]'") from None

    app = _app(ctx, **model)
    web = create_app(app, max_upload_bytes=max_upload_mb * 1024 * 1024, allowed_hosts=allowed_hosts or None,
                     allowed_origins=allowed_origins or None)
    limits = Limits(header_timeout=header_timeout, body_timeout=body_timeout, keep_alive=keep_alive,
                    max_connections=max_connections)
    click.echo(f"imsearch: serving {app.count()} images on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    serve_app(web, host=host, port=port, limits=limits,
              log_level="info" if ctx.meta.get("imsearch.debug") else "warning")


@cli.command()
@click.option("--threshold", type=click.FloatRange(0, 2, max_open=True), metavar="D",
              help="Largest cosine distance between duplicates [default: the model's calibrated one, if it "
                   "separates copies from neighbours; `imsearch calibrate` shows it].")
@click.option("--hash-bits", type=click.IntRange(0, 64), metavar="B",
              help="Largest Hamming distance between duplicates' perceptual hashes [default: calibrated].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of groups.")
@model_options
@click.pass_context
def duplicates(ctx: click.Context, threshold: float | None, hash_bits: int | None, as_json: bool,
               model: dict[str, Any]) -> None:
    """Print groups of stored copies, whatever their classes: the same bytes, perceptual hashes within the
    calibrated bits, or (where the model tells copies from neighbours) embeddings within the calibrated distance."""
    from .terminal import table

    app = _app(ctx, **model)
    with progress_bar("calibrate", shown=not as_json) as calibrating, \
            progress_bar("duplicates", shown=not as_json) as progress:
        groups, used = app.duplicates(distance=threshold, hash_bits=hash_bits, progress=progress,
                                      calibrating=calibrating)
    if as_json:
        click.echo(json.dumps([g.to_json() for g in groups], indent=2))
        return
    if groups:
        rows = [(g.number, i.id, i.cls, "-" if i.nearest is None else f"{i.nearest:.4f}", i.path)
                for g in groups for i in g.images]
        click.echo(table(("group", "id", "class", "nearest", "path"), rows))
    images = sum(len(g.images) for g in groups)
    click.echo(f"{len(groups)} group(s) of duplicates, {images} image(s); {used.verdict()}")


@cli.command()
@click.option("--sample", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="Stored photos whose harmless copies are embedded.")
@click.option("--set-distance", type=click.FloatRange(0, 2, max_open=True), metavar="D",
              help="Override the duplicate distance with D (kept across calibrations).")
@click.option("--set-hash-bits", type=click.IntRange(0, 64), metavar="B",
              help="Override the perceptual hash threshold with B bits.")
@click.option("--clear", is_flag=True, help="Remove the overrides: the calibrated figures apply again.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@model_options
@click.pass_context
def calibrate(ctx: click.Context, sample: int, set_distance: float | None, set_hash_bits: int | None, clear: bool,
              as_json: bool, model: dict[str, Any]) -> None:
    """Measure how far re-encoded, half-size, EXIF-rotated and cropped copies of stored photos land from their
    originals against their nearest distinct photos, for the model in use, and store the duplicate distance and
    hash threshold that follow (or override them)."""
    app = _app(ctx, **model)
    if set_distance is not None or set_hash_bits is not None or clear:
        result = app.set_calibration(distance=set_distance, hash_bits=set_hash_bits, clear=clear)
    else:
        with progress_bar("calibrate", shown=not as_json) as progress:
            result = app.calibrate(sample=sample, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    from .audit.report import calibration_text

    click.echo(calibration_text(result))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("imsearch-audit"),
              show_default=True, help="Folder for findings.csv, the other CSVs, summary.json and report.html.")
@click.option("-k", "--neighbours", "k", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Neighbours that vote on each image's class.")
@click.option("--recalibrate", is_flag=True, help="Measure the model's calibration again first.")
@click.option("--duplicate-distance", type=click.FloatRange(0, 2, max_open=True), metavar="D",
              help="Cosine distance for duplicates and leaks in this audit [default: calibrated].")
@click.option("--hash-bits", type=click.IntRange(0, 64), metavar="B",
              help="Perceptual hash threshold in this audit [default: calibrated].")
@click.option("--no-pictures", is_flag=True, help="Leave the pictures out of report.html (faster).")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json with every finding to stdout.")
@model_options
@click.pass_context
def audit(ctx: click.Context, out: Path, k: int, recalibrate: bool, duplicate_distance: float | None,
          hash_bits: int | None, no_pictures: bool, as_json: bool, model: dict[str, Any]) -> None:
    """Find label suspects, leaks between classes, duplicate groups and outliers among the stored images.

    Each image's nearest neighbours come from the indexes (memory grows with the images, not their pairs). The
    findings replace the image_audit table and are written to --out as CSV, JSON and an HTML report.
    """
    from .audit.report import text, write

    app = _app(ctx, **model)
    with progress_bar("calibrate", shown=not as_json) as calibrating, \
            progress_bar("audit", shown=not as_json) as progress:
        result = app.audit(k=k, recalibrate=recalibrate, duplicate_distance=duplicate_distance, hash_bits=hash_bits,
                           progress=progress, calibrating=calibrating)
    try:
        written = write(result, out, pictures=not no_pictures)
    except OSError as exc:
        raise click.ClickException(f"cannot write the report in {out}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(text(result))
    click.echo(f"\nreport: {written.html} ({result.seconds:.1f} s)")


@cli.group()
def db() -> None:
    """The database: migrations and connection details."""


@db.command("upgrade")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=LOCK_TIMEOUT, show_default=True,
              metavar="SECONDS",
              help="How long to wait for another session's migration lock (0: as long as it takes).")
@click.pass_context
def db_upgrade(ctx: click.Context, lock_timeout: float) -> None:
    """Create or migrate imsearch's schema to the newest revision.

    Migrations run under a lock: while another session holds it, this says who, and gives up after --lock-timeout.
    """
    with index_builds() as progress:
        upgraded = _app(ctx).upgrade(lock_timeout=lock_timeout or None, progress=progress)
    click.echo(f"{upgraded.where}: schema at revision {upgraded.revision}")
    if upgraded.cache_note is not None:
        click.echo(f"note: {upgraded.cache_note}", err=True)


@db.command("url")
@click.option("--tcp", is_flag=True, help="Print the TCP URI of the running `imsearch db serve` instead.")
@click.pass_context
def db_url(ctx: click.Context, tcp: bool) -> None:
    """Print the libpq connection URI imsearch uses (psql "$(imsearch db url)").

    While `imsearch db serve` runs, its TCP connection details follow on stderr.
    """
    from .db.embedded import database_url
    from .settings import Settings

    url = database_url(Settings.from_env(ctx.obj["database_url"]))
    endpoint = None
    if not ctx.obj["database_url"]:
        from .db.server import serving

        endpoint = serving()
    if tcp:
        if endpoint is None:
            raise ImsearchError("no `imsearch db serve` is running on the embedded PostgreSQL")
        click.echo(endpoint.url())
        return
    click.echo(url)
    if endpoint is not None:
        click.echo("served over TCP by `imsearch db serve`:", err=True)
        for line in endpoint.describe():
            click.echo(line, err=True)


@db.command("grant-reader")
@click.argument("name")
@click.option("--password", envvar="IMSEARCH_READER_PASSWORD",
              help="The role's password [env IMSEARCH_READER_PASSWORD]; default: a new random one, printed once.")
@click.pass_context
def db_grant_reader(ctx: click.Context, name: str, password: str | None) -> None:
    """Create or update NAME: a login role that can only read imsearch's SQL views and functions (BI tools)."""
    reader = _app(ctx).grant_reader(name, password)
    click.echo(f"{'created' if reader.created else 'updated'} read-only role {reader.name} "
               f"on database {reader.database}")
    if reader.password is not None:
        click.echo(f"password: {reader.password}  (shown once; run this again to set a new one)")


# `db check-recall` asks this many stored photos by default, and warns below this recall@5.
RECALL_CHECK_QUERIES = 50
MIN_RECALL = 0.99


@db.command("check-recall")
@click.option("--sample", type=click.IntRange(1, 10_000), default=RECALL_CHECK_QUERIES, show_default=True,
              help="Stored photos to ask, at random.")
@click.option("--json", "as_json", is_flag=True, help="Print {mode: recall} as JSON.")
@click.pass_context
def db_check_recall(ctx: click.Context, sample: int, as_json: bool) -> None:
    """Measure each mode's recall@5 through the indexes against an exact scan, on stored photos.

    The indexes hold a fold of the embedding and every answer is re-ranked by the exact distance; how much the fold
    finds depends on the embeddings, so it is measured on the library's own (docs/scaling.md). Stored photos are
    the easy queries: a warning below 0.99 here means photos from elsewhere fare worse.
    """
    recall = _app(ctx).check_recall(sample=sample)
    if as_json:
        click.echo(json.dumps(recall))
        return
    for mode, value in recall.items():
        click.echo(f"{mode:6} recall@5 {'-' if value is None else f'{value:.3f}'}")
    low = [m for m, v in recall.items() if v is not None and v < MIN_RECALL]
    if low:
        click.echo(f"warning: mode {', '.join(low)} below {MIN_RECALL} against an exact scan; widen the re-ranking "
                   "(SET imsearch.rerank_depth or imsearch.rerank_margin, docs/sql.md) or search with --exact",
                   err=True)


@db.group("shard")
def db_shard() -> None:
    """Spread the library over PostgreSQL servers (postgres_fdw and dblink; docs/scaling.md).

    This database becomes the coordinator: `images` is partitioned by the hash of path into foreign tables, one
    per shard. ingest, load and find work as before, and every shard answers each search with its own indexes.
    """


def _shard_table(shards: Sequence[Any]) -> str:
    lines = [f"{'server':18} {'share':>7} {'rows':>10}  url"]
    for s in shards:
        rows = "-" if s.rows is None else f"{s.rows:,}"
        lines.append(f"{s.server:18} {s.share:>7.1%} {rows:>10}  {s.url}")
    return "\n".join(lines)


@db_shard.command("add")
@click.argument("urls", nargs=-1, required=True, metavar="URL...")
@click.option("--rebalance", is_flag=True,
              help="Lay the library out equally over every shard (most rows move), rather than give each new shard "
                   "half of the largest one's.")
@click.option("--json", "as_json", is_flag=True, help="Print the shards and the rows moved as JSON.")
@click.pass_context
def db_shard_add(ctx: click.Context, urls: tuple[str, ...], rebalance: bool, as_json: bool) -> None:
    """Add shard servers: each URL an empty PostgreSQL database with pgvector, which gets imsearch's schema.

    The coordinator reaches each shard with the URL's user and password (a user mapping). Shards added to a
    library without rows share it equally; a shard added to one with rows takes half of the largest shard's
    rows. Rows already stored here move to the shards.
    """
    with progress_bar("rows", shown=not as_json) as progress:
        relaid = _app(ctx).add_shards(list(urls), rebalance=rebalance,
                                      progress=lambda _label, done, total: progress(done, total))
    if as_json:
        click.echo(json.dumps(relaid.to_json(), indent=2))
        return
    click.echo(_shard_table(relaid.shards))
    click.echo(f"{relaid.moved:,} row(s) moved")


@db_shard.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the shards as JSON.")
@click.pass_context
def db_shard_list(ctx: click.Context, as_json: bool) -> None:
    """List the shards: foreign server, share of the hash space, rows, and where (no password)."""
    found = _app(ctx).shards()
    if as_json:
        click.echo(json.dumps([s.to_json() for s in found], indent=2))
        return
    click.echo(_shard_table(found) if found else "no shards: the library is on this server alone")


@db_shard.command("remove")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print the shards left and the rows moved as JSON.")
@click.pass_context
def db_shard_remove(ctx: click.Context, url: str, as_json: bool) -> None:
    """Take the shard at URL out of the library; its rows move to the other shards first."""
    with progress_bar("rows", shown=not as_json) as progress:
        relaid = _app(ctx).remove_shard(url, progress=lambda _label, done, total: progress(done, total))
    if as_json:
        click.echo(json.dumps(relaid.to_json(), indent=2))
        return
    click.echo(_shard_table(relaid.shards))
    click.echo(f"{relaid.moved:,} row(s) moved")


@db.command("index-other", hidden=True)
@click.option("--drop", is_flag=True, hidden=True, help="Accepted and ignored: there is nothing to drop.")
def db_index_other(drop: bool) -> None:
    """Kept so that scripts calling it keep working: there is nothing left to build."""
    click.echo("nothing to do: mode other searches indexes that hold every row already (each other class's own, or "
               "the whole-table index); `imsearch db check-recall` measures it")


@db.command("backfill-hashes")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Decoding threads [default: from the CPU count].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def db_backfill_hashes(ctx: click.Context, workers: int | None, as_json: bool) -> None:
    """Give rows stored before imsearch hashed images their perceptual hash, from their files; no re-embedding.

    Ingest stores a 64-bit perceptual hash of every image (it finds byte copies, re-encodes, resizes and
    EXIF-rotated copies, whatever the model). This reads the file of each row without one, hashes it as ingest
    would, and stores it; it needs no model. A file that is missing, unreadable, or changed since it was stored
    is reported as `PATH: reason` and keeps no hash (a changed one needs `imsearch ingest` again). Exit 1 when
    some rows could not be hashed; running it again retries only those.
    """
    from .files import printable

    app = _app(ctx)
    with progress_bar("hashes", shown=not as_json) as progress:
        result = app.backfill_hashes(workers=workers, progress=progress)
    for failure in result.failed:
        click.echo(f"{printable(failure.path)}: {failure.error}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"hashed {result.hashed} row(s)"
                   + (f"; {len(result.failed)} could not be (see above)" if result.failed else ""))
    if result.failed:
        ctx.exit(1)


@db.command("serve")
@click.option("--port", type=click.IntRange(1, 65535), default=5432, show_default=True,
              help="TCP port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address(es) to listen on, comma-separated; anything but loopback lets other machines in.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="TLS certificate (PEM); required with a --host beyond loopback.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Its private key (PEM); required with a --host beyond loopback.")
@click.pass_context
def db_serve(ctx: click.Context, port: int, host: str, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Keep the embedded PostgreSQL running and reachable over TCP (password auth) until Ctrl-C or SIGTERM."""
    from .db.embedded import start
    from .db.server import serve, wait
    from .db.store import Store

    if ctx.obj["database_url"]:
        raise click.UsageError("db serve serves the embedded PostgreSQL; the server in DATABASE_URL is reached "
                               "directly")
    Store.open(start()).close()  # the data folder and the schema when new, its revision checked, before serving
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serve(host, port, tls_cert=tls_cert, tls_key=tls_key) as endpoint:
            click.echo("serving the embedded PostgreSQL over TCP until Ctrl-C (or SIGTERM):")
            for line in endpoint.describe():
                click.echo(line)
            wait(endpoint, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("stopped: the embedded PostgreSQL no longer listens on TCP", err=True)


def main() -> None:
    # SIGTERM ends the process as Ctrl-C does, through exit handlers: the embedded server then stops with its last
    # user instead of waiting for its watcher.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    cli(prog_name="imsearch")
