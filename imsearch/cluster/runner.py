"""The Ray runner: the driver's files go to a Ray Data `map_batches` over an actor pool, one model per actor, and
the mapper's Arrow batches stream back (`iter_batches`) to the driver, which writes them (imsearch.ingest).

A killed actor is restarted, and its batch run again, by Ray's own retries (`max_restarts`, `max_task_retries`):
the driver writes each path once, by an upsert that is idempotent on the path. Every worker must read the
driver's files at the same path (a shared file system, or the same mount everywhere): a file it cannot open is
reported as not readable on that worker, and the job goes on.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Generator

import pyarrow as pa

from .. import errors
from ..errors import ImsearchError
from ..mapper import Mapper, ModelSpec, files_table

log = logging.getLogger(__name__)

# Threads an actor gets at most on a CPU cluster: past four, ONNX Runtime and torch gain little per added thread
# on one batch of 32 (docs/inference.md), and more actors of four keep every core busy instead.
MAX_CPUS_PER_ACTOR = 4
# A GPU actor's CPUs, for decoding beside its GPU, at most.
GPU_ACTOR_CPUS = 4


@dataclass(frozen=True)
class Layout:
    """The actor pool: how many actors, and the CPUs (threads) and GPUs of each."""

    actors: int
    cpus: int
    gpus: int = 0


def layout(nodes: list[dict[str, float]], *, cpus_per_actor: int | None = None, use_gpus: bool = True) -> Layout:
    """The pool for these nodes' resources: one actor per GPU where there are GPUs, else one actor per
    `cpus_per_actor` CPUs of each node (default: as many as a node has, up to MAX_CPUS_PER_ACTOR), so that the
    actors' threads add up to the cores, no more: two actors of two threads on two cores would take turns."""
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    cpus = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1]
    if gpus and use_gpus:
        per_gpu = min(int(n.get("CPU", 0)) // max(1, int(n.get("GPU", 0))) for n in nodes if n.get("GPU", 0) >= 1)
        return Layout(gpus, max(1, min(GPU_ACTOR_CPUS, per_gpu)), 1)
    if not cpus:
        raise ImsearchError("the Ray cluster has no CPU to run an actor on")
    per = cpus_per_actor or min(MAX_CPUS_PER_ACTOR, min(cpus))
    actors = sum(c // per for c in cpus)
    if actors == 0:
        raise ImsearchError(f"no node of the Ray cluster has {per} CPUs for an actor (the largest has {max(cpus)})")
    return Layout(actors, per)


class RayMapper(Mapper):
    """The mapper in a Ray actor: its threads the CPUs Ray gave it, and a file it cannot read named with its node."""

    def __init__(self, spec: ModelSpec, threads: int, identity: str) -> None:
        import ray

        super().__init__(spec, threads=threads, where=f"on the Ray worker {ray.util.get_node_ip_address()}",
                         identity=identity)


class RayRunner:
    """Runs the mapper on a Ray cluster: `auto` joins the one running here (`ray start --head`), `local` starts
    one for the job, anything else is an address (`ray://head:10001`, `head:6379`)."""

    def __init__(self, spec: ModelSpec, address: str = "auto", *, cpus_per_actor: int | None = None) -> None:
        if spec.precision == "int8":
            raise ImsearchError("--precision int8 is calibrated on the library's photos: ingest with --ray at fp32")
        self.spec = spec
        self.address = address
        self.cpus_per_actor = cpus_per_actor
        self.layout: Layout | None = None

    def map(self, files: list[tuple[str, str | None]], batch_size: int) -> Generator[pa.Table, None, None]:
        """The mapper's batches of these files, as they come back (in no set order)."""
        if not files:
            return
        ray = _import_ray()
        joined = _connect(ray, self.address)
        try:
            yield from self._run(ray, files, batch_size)
        finally:
            if joined:
                ray.shutdown()

    def _run(self, ray: Any, files: list[tuple[str, str | None]], batch_size: int) -> Generator[pa.Table, None, None]:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # imsearch draws its own bar; stdout holds the --json summary
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan, timings and advice, at every run
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.layout = pool = layout(nodes, cpus_per_actor=self.cpus_per_actor, use_gpus=self.spec.device != "cpu")
        log.info("ray: %d actor(s) of %d CPU(s) and %d GPU(s) for %d file(s)", pool.actors, pool.cpus, pool.gpus,
                 len(files))
        table = files_table(files)
        blocks = [table.slice(i, batch_size) for i in range(0, len(files), batch_size)]
        home = os.environ.get("IMSEARCH_HOME")
        # A killed actor is restarted, and its batch run again, by Ray Data's own retries (its defaults for an actor
        # pool: max_restarts and max_task_retries of -1, as often as it takes).
        dataset = ray.data.from_arrow(blocks).map_batches(
            RayMapper, fn_constructor_kwargs={"spec": self.spec, "threads": pool.cpus, "identity": self.spec.identity},
            batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus, num_gpus=pool.gpus or None,
            # the ONNX export cache; a worker elsewhere without that folder makes it
            runtime_env={"env_vars": {"IMSEARCH_HOME": home}} if home else None)
        try:
            yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        except ray.exceptions.RayError as exc:
            raise _explained(exc) from None


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the extra's part imsearch uses
    except ImportError as exc:
        raise ImsearchError(f"--ray needs Ray Data ({exc}): pip install 'imsearch[ray]'") from None
    return ray


def _connect(ray: Any, address: str) -> bool:
    """Connect this process to the cluster unless it is connected; True when it connected here (and so
    disconnects, stopping a `local` cluster, once done)."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address == "local":
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ImsearchError(f"--ray {address}: cannot join a Ray cluster ({_first_line(exc)}); start one with "
                            "`ray start --head`, or use --ray local (a cluster with token authentication, Ray's "
                            "default since 2.52, takes a driver given its address with RAY_AUTH_MODE=token)") from None
    return True


def _explained(exc: BaseException) -> ImsearchError:
    """A Ray failure as one line. An imsearch error raised in an actor reaches the driver as the text of its
    traceback (Ray Data wraps it): it keeps its own message, and its type where that takes a message alone."""
    found = re.findall(r"^imsearch\.errors\.(\w+): (.+)$", str(exc), re.MULTILINE)
    if found:
        name, message = found[-1]
        kind = getattr(errors, name, ImsearchError)
        if not (isinstance(kind, type) and issubclass(kind, ImsearchError)) or issubclass(kind, errors.BadImage):
            kind = ImsearchError
        return kind(message)
    return ImsearchError(f"the Ray job failed: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
