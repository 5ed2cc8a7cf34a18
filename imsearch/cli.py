"""The `imsearch` command: parses options, calls the library, prints results, turns errors into one line."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from .errors import ImsearchError

log = logging.getLogger("imsearch")


class Group(click.Group):
    """Every library error becomes one line and exit 1; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ImsearchError as exc:
            if ctx.meta.get("imsearch.debug"):
                raise
            raise click.ClickException(str(exc)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the last net: one line instead of a traceback
            if ctx.meta.get("imsearch.debug"):
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
            ) from None


def _app(ctx: click.Context, weights: str | None = None, device: str = "auto", precision: str = "auto") -> Any:
    from .api import Imsearch

    app = Imsearch(ctx.obj["database_url"], weights=weights, device=device, precision=precision)
    ctx.call_on_close(app.close)
    return app


weights_option = click.option(
    "--weights", envvar="IMSEARCH_WEIGHTS", metavar="NAME|FILE",
    help="torchvision ResNet50_Weights name (default IMAGENET1K_V1) or a local .pth file [env IMSEARCH_WEIGHTS].",
)
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="Where the model runs; auto picks CUDA when available.")
precision_option = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                                show_default=True, help="Model precision; auto is fp32 (see docs/scaling.md).")


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
    ctx.meta["imsearch.debug"] = debug
    ctx.obj = {"database_url": database_url}


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@weights_option
@device_option
@precision_option
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Images per model batch and per database transaction.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Decoding threads [default: from the CPU count].")
@click.option("--prune", is_flag=True, help="Delete rows of files under FOLDER that no longer exist.")
@click.option("--reembed", is_flag=True, help="Re-embed rows stored with another model, in place.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def ingest(ctx: click.Context, folder: Path, weights: str | None, device: str, precision: str, batch_size: int,
           workers: int | None, prune: bool, reembed: bool, as_json: bool) -> None:
    """Embed and store every image under FOLDER (class = first-level sub-folder).

    Unchanged files are skipped, changed ones re-embedded. Exit 1 when some files could not be stored.
    """
    app = _app(ctx, weights, device, precision)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    bar = None
    try:
        if sys.stderr.isatty() and not as_json:
            from tqdm import tqdm

            bar = tqdm(total=0, unit="img", desc="ingest", file=sys.stderr, dynamic_ncols=True)

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        result = app.ingest(folder, batch_size=batch_size, workers=workers, prune=prune, reembed=reembed,
                            progress=progress, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    for failure in result.failed:
        click.echo(f"{failure.path}: {failure.error}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        rate = (result.added + result.updated) / result.seconds if result.seconds else 0.0
        click.echo(
            f"{result.added} added, {result.updated} updated, {result.skipped} skipped, "
            f"{len(result.failed)} failed in {result.seconds:.1f} s ({rate:.1f} img/s)"
            + (" (interrupted: re-run to finish)" if result.interrupted else "")
        )
        if result.missing and not prune:
            click.echo(f"{len(result.missing)} stored file(s) under {folder} no longer exist; "
                       "`--prune` removes them", err=True)
        elif result.pruned:
            click.echo(f"pruned {result.pruned} row(s) of vanished files")
    if result.failed or result.interrupted:
        ctx.exit(1)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-k", "--top", "k", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="How many matches per query.")
@click.option("--same-class", "mode", flag_value="same", help="Only images of the query's class.")
@click.option("--exclude-class", "mode", flag_value="other", help="Only images of other classes.")
@click.option("--mode", "mode", type=click.Choice(["all", "same", "other"]), default="all", show_default=True,
              help="all, same (as --same-class) or other (as --exclude-class).")
@click.option("--class", "query_class", metavar="NAME",
              help="The query's class [default: of a stored copy, else its folder's name].")
@click.option("--include-self", is_flag=True, help="Keep stored images with the query's exact content.")
@click.option("--exact", is_flag=True, help="Exact scan instead of the HNSW index.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one item per query.")
@weights_option
@device_option
@precision_option
@click.pass_context
def find(ctx: click.Context, images: tuple[Path, ...], k: int, mode: str, query_class: str | None,
         include_self: bool, exact: bool, as_json: bool, weights: str | None, device: str, precision: str) -> None:
    """Print the K stored images closest to each IMAGE by cosine distance."""
    from .report import RANK_COLUMNS, rank_rows, table

    app = _app(ctx, weights, device, precision)
    results = app.find(list(images), mode, k=k, query_class=query_class, include_self=include_self, exact=exact)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=2))
        return
    rows = [row for r in results for row in rank_rows(r)]
    click.echo(table(RANK_COLUMNS, rows))
    for r in results:
        if len(r.matches) < k:
            click.echo(f"{r.query}: only {len(r.matches)} stored image(s) match mode {r.mode}", err=True)


@cli.group()
def db() -> None:
    """The database: migrations and connection details."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or migrate imsearch's schema to the newest revision."""
    from .settings import Settings, libpq_url
    from .store import redact, upgrade

    url = libpq_url(Settings.from_env(ctx.obj["database_url"]))
    revision = upgrade(url)
    click.echo(f"{redact(url)}: schema at revision {revision}")


@db.command("url")
@click.pass_context
def db_url(ctx: click.Context) -> None:
    """Print the libpq connection URI imsearch uses (psql "$(imsearch db url)")."""
    from .settings import Settings, libpq_url

    click.echo(libpq_url(Settings.from_env(ctx.obj["database_url"])))


def main() -> None:
    cli(prog_name="imsearch")
