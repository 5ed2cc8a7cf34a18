"""The HTTP server under the page: uvicorn's h11 protocol with deadlines and a cap on open connections.

uvicorn closes a connection that stays idle after an answer (`timeout_keep_alive`), but waits for ever for a
request's headers and body, and accepts connections until the process runs out of file descriptors: then every
request times out. Here a request's headers must arrive within `header_timeout` seconds of the connection (or of
the last answer) and its body within `body_timeout` seconds of its headers; a request cut off gets 408 and its
connection closes, so the app sees the client gone and Starlette closes the upload's temporary file. At most
`max_connections` stay open, under the open-file limit with room for the database, files and decodes: a new one
beyond that displaces the connection that has waited longest for a request, or gets 503 when every one is busy.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
KEEP_ALIVE = 5
MAX_CONNECTIONS = 1000
# Descriptors kept back from the open-file limit: the database connection, the model's files, stored images read,
# the log, the event loop and the worker threads' decodes.
RESERVED_FILES = 128
# A connection may hold two descriptors: its socket and an upload's temporary file (a part over 1 MB spools there).
FILES_PER_CONNECTION = 2
# The listen backlog, which is also how many connections asyncio accepts in one turn of the loop, before any of
# them is counted: up to about three turns' worth are open and not yet counted, and are kept room for.
BACKLOG = 64
UNCOUNTED = 3 * BACKLOG
# How often the loop may log that accept() ran out of descriptors (asyncio logs it once per waiting connection).
ACCEPT_ERROR_EVERY = 60.0
MIN_CONNECTIONS = 8


@dataclass(frozen=True)
class Limits:
    """How long a request may take to arrive, how long an idle connection stays, how many connections at once."""

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    keep_alive: int = KEEP_ALIVE
    max_connections: int = MAX_CONNECTIONS


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard one where the system allows; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(requested: int, open_files: int) -> int:
    """The most connections that fit under `open_files` descriptors with RESERVED_FILES kept back and room for
    the connections accepted but not yet counted, at most `requested`; never under MIN_CONNECTIONS."""
    if open_files == resource.RLIM_INFINITY:
        return requested
    room = (open_files - RESERVED_FILES - UNCOUNTED) // FILES_PER_CONNECTION
    return max(MIN_CONNECTIONS, min(requested, room))


def plain_answer(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP/1.1 answer with a one-line JSON detail that closes the connection, written past h11 (which
    answers only a request it has read)."""
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "x-content-type-options: nosniff\r\nconnection: close\r\n\r\n").encode() + body


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and body, and the connection cap.

    `phase` is what the connection waits for: "headers" (a new request, from its connection or the last answer),
    "body" (the rest of a request whose headers came), or None (the app is answering, or it is closed).
    """

    limits = Limits()
    cap = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: str | None = None
        self.waiting_since = 0.0
        self.partial = False  # bytes of a request have come, but not yet its headers
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.cap and not self._make_room():
            log.warning("%d connections open, the limit: a new one was refused", len(self.connections) - 1)
            self.transport.write(plain_answer(503, "Service Unavailable", (
                f"the server has {self.cap} connections open, its limit; try again in a moment")))
            self.transport.close()
            return
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self.phase = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase == "headers":
            self.partial = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False when every other one is busy."""
        waiting = [c for c in self.connections
                   if isinstance(c, DeadlineProtocol) and c is not self and c.phase == "headers"
                   and not c.transport.is_closing()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since)
        oldest.expire("headers", displaced=True)
        return True

    def _follow(self) -> None:
        """Arm the deadline of what the connection now waits for, when that changed."""
        if self.transport is None or self.transport.is_closing():
            phase = None
        elif self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            phase = "headers"
        elif self.conn.their_state is h11.SEND_BODY:
            phase = "body"
        else:
            phase = None
        if phase == self.phase:
            return
        self._cancel()
        self.phase = phase
        self.waiting_since = time.monotonic()
        if phase == "headers":
            self.partial = False
            self._deadline = self.loop.call_later(self.limits.header_timeout, self.expire, "headers")
        elif phase == "body":
            self._deadline = self.loop.call_later(self.limits.body_timeout, self.expire, "body")

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def expire(self, phase: str, *, displaced: bool = False) -> None:
        """Close the connection: silently when it sent nothing of a new request, else with 408 and one line. The
        app's `receive` then says the client left, which ends a form being parsed and closes its files."""
        self._deadline = None
        if self.transport.is_closing() or self.phase != phase:
            return
        if phase == "body" or self.partial:
            seconds = self.limits.body_timeout if phase == "body" else self.limits.header_timeout
            detail = (f"the request's {phase} did not arrive within {seconds:g} s" if not displaced else
                      "the request's headers were still on their way when the server needed the connection")
            self.transport.write(plain_answer(408, "Request Timeout", detail))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # before the app runs again: it must not answer on a closed socket
            self.cycle.message_event.set()
        self.phase = None
        self.transport.close()


def protocol(limits: Limits, cap: int) -> type[DeadlineProtocol]:
    """The protocol class for one server: `DeadlineProtocol` with these limits and this connection cap."""
    return type("ImsearchProtocol", (DeadlineProtocol,), {"limits": limits, "cap": cap})


class Server(uvicorn.Server):
    """uvicorn's server, whose loop logs running out of descriptors in accept() once a minute, in one line."""

    last_accept_error = -ACCEPT_ERROR_EVERY

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(self.loop_error)
        await super().serve(sockets)

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not isinstance(exc, OSError) or exc.errno not in (errno.EMFILE, errno.ENFILE):
            loop.default_exception_handler(context)
            return
        if time.monotonic() - self.last_accept_error >= ACCEPT_ERROR_EVERY:
            self.last_accept_error = time.monotonic()
            log.warning("new connections wait: %s (open-file limit %d)", exc.strerror,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def serve_app(app: Any, *, host: str, port: int, limits: Limits, log_level: str = "warning") -> None:
    """Run the app under uvicorn with these limits until interrupted; the open-file limit is raised first."""
    cap = connection_cap(limits.max_connections, raise_open_file_limit())
    if cap < limits.max_connections:
        log.warning("at most %d connections at once (not %d): the open-file limit is %d", cap,
                    limits.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol(limits, cap),
                            timeout_keep_alive=limits.keep_alive, backlog=BACKLOG, loop="asyncio")
    Server(config).run()
