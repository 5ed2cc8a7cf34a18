"""Decodes in child processes that can be killed: an upload's decode stops when its client goes away.

A thread cannot be stopped while Pillow decodes in it, so the page decodes in a few child processes of its own
(fresh interpreters: no model, no threads, no database connection) and kills one whose client has gone, or that
was cancelled. A killed decoder is waited for before its slot is given back, so a slot is never free while a
decode still holds memory; the next decode starts a new process (about half a second). A decoder that crashes or
runs out of memory costs its own request only.
"""

from __future__ import annotations

import io
import multiprocessing
import signal
import threading
import weakref
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import anyio
from PIL import Image

from ..errors import BadImage
from ..model import pixels

T = TypeVar("T")
# A fresh interpreter, not a fork of the server: forking a process that runs threads can copy a held lock.
CONTEXT = multiprocessing.get_context("spawn")


class ClientGone(Exception):
    """The request's client closed its connection before the decode ended; the decode was stopped."""


def load_upload(data: bytes, name: str, prep: pixels.Preprocess) -> pixels.Loaded:
    """An upload decoded into the model's input, under the upload's pixel cap."""
    return pixels.load(data, name, prep, max_decode_pixels=pixels.UPLOAD_MAX_PIXELS)


def make_thumbnail(data: bytes, name: str, size: int, draft: pixels.Preprocess) -> bytes:
    """An upright RGB JPEG at most `size` pixels on its long side, decoded at the JPEG draft scale `draft` needs."""
    img, _ = pixels.open_image(data, name, prep=draft)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=82, optimize=True)
    return out.getvalue()


def _serve(conn: Connection, block_bytes: int | None) -> None:
    """A decoder's loop: call what the server sends, send back its result or its BadImage, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops its decoders
    if block_bytes is not None:
        Image.core.set_block_size(block_bytes)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            outcome: tuple[Any, ...] = ("ok", fn(*args))
        except BadImage as exc:  # its subclass, path and reason, since BadImage does not pickle by its message
            outcome = ("bad", type(exc), exc.path, exc.reason)
        except MemoryError:
            outcome = ("bad", BadImage, args[1] if len(args) > 1 else "image", "cannot decode: out of memory")
        conn.send(outcome)


class _Decoder:
    """One child process and the pipe to it."""

    def __init__(self, block_bytes: int | None) -> None:
        self.conn, child = CONTEXT.Pipe()
        self.process = CONTEXT.Process(target=_serve, args=(child, block_bytes), name="imsearch-decode",
                                       daemon=True)
        self.process.start()
        child.close()

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
        self.conn.send((fn, args))
        return self.conn.recv()  # EOFError once the process is gone

    def kill(self) -> None:
        """Kill and reap the process. The pipe closes when the last thread reading it lets go (at once, on EOF):
        closed here, its descriptor could be reused while a cancelled call still reads it."""
        self.process.kill()
        self.process.join()


def _kill_all(decoders: list[_Decoder]) -> None:
    for decoder in decoders:
        decoder.kill()


class Decoders:
    """Child processes that decode, at most as many as the decode slots that use them, started when first needed."""

    def __init__(self, block_bytes: int | None = None) -> None:
        self.block_bytes = block_bytes
        self._idle: list[_Decoder] = []
        self._lock = threading.Lock()
        weakref.finalize(self, _kill_all, self._idle)

    def _take(self) -> _Decoder:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Decoder(self.block_bytes)

    async def run(
        self, fn: Callable[..., T], *args: Any, name: str, until: Callable[[], Awaitable[None]] | None = None,
        recycle: bool = False,
    ) -> T:
        """`fn(*args)` in a decoder process; killed (and ClientGone raised) as soon as `until()` returns.

        `recycle`: end the process afterwards, so that the memory a large decode left in its heap goes back.
        """
        decoder = await anyio.to_thread.run_sync(self._take)
        outcome: tuple[Any, ...] | None = None
        try:
            async with anyio.create_task_group() as tasks:
                if until is not None:
                    tasks.start_soon(_cancel_when, until, tasks.cancel_scope)
                try:
                    outcome = await anyio.to_thread.run_sync(decoder.call, fn, args, abandon_on_cancel=True)
                except EOFError:
                    outcome = ("died", decoder.process)
                tasks.cancel_scope.cancel()
        finally:
            if outcome is None or outcome[0] == "died" or recycle:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(decoder.kill)  # reaped before the caller's slot is freed
            else:
                with self._lock:
                    self._idle.append(decoder)
        if outcome is None:
            raise ClientGone(f"{name}: the client went away; its decode was stopped")
        if outcome[0] == "died":
            raise BadImage(name, f"cannot decode: the decoder stopped (exit code {decoder.process.exitcode})")
        if outcome[0] == "bad":
            _, kind, path, reason = outcome
            raise kind(path, reason)
        return outcome[1]  # type: ignore[no-any-return]


async def _cancel_when(until: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
    await until()
    scope.cancel()
