"""The page's guards, ASGI middlewares that answer before any route runs: a body over the upload limit (413), a
Host header that names someone else (400), a request another site's page made the browser send (403); and two
that shape every answer: HEAD as GET, and `X-Content-Type-Options: nosniff`."""

import ipaddress
import os
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Host names a request may give besides these and the address it came in on; comma-separated, "*" for any.
ALLOWED_HOSTS_ENV = "IMSEARCH_ALLOWED_HOSTS"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Sites whose pages may send requests here besides this one; comma-separated scheme://host[:port], "*" for any.
ALLOWED_ORIGINS_ENV = "IMSEARCH_ALLOWED_ORIGINS"
DEFAULT_PORTS = {"http": 80, "https": 443}
HOST_HEADER = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::\d{1,5})?")


class UploadLimit:
    """Refuses a request body over the limit before it is parsed or spooled: 413 with a one-line message."""

    def __init__(self, app: ASGIApp, max_bytes: int, message: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self.message)  # FastAPI passes it on from the form parser
            return message

        await self.app(scope, counted, send)


def host_of(value: str) -> str | None:
    """The host a Host header (or an allow-list entry) names: lower-case, without its port, an IPv6 address in
    brackets; None when it is no host name."""
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        found = HOST_HEADER.fullmatch(value.strip().lower())
        if found is None:
            return None
        host = found["host"]
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None if host.startswith("[") else host
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def allowed_hosts_from_env() -> list[str]:
    return [h for h in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()]


class TrustedHosts:
    """Answers 400 to a request whose Host header names a host not allowed here.

    A page on any other name that resolves to this server (DNS rebinding) would otherwise read its answers, and
    the result URLs are built from that header. Allowed: loopback, the address the connection came in on (an IP
    literal names no one else), and `hosts`; "*" allows any host.
    """

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in [h.strip() for h in hosts]
        self.hosts = {host for h in (*LOOPBACK_HOSTS, *hosts) if (host := host_of(h)) is not None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("host", "")
        host = host_of(given)
        server = scope.get("server") or ("", None)
        try:
            here = host_of(str(ipaddress.ip_address(server[0])))
        except ValueError:
            here = None
        if host is not None and (host in self.hosts or host == here):
            await self.app(scope, receive, send)
            return
        message = (f"this server does not answer to the host {given[:100]!r}; "
                   f"list it in {ALLOWED_HOSTS_ENV} to serve it under that name")
        await JSONResponse({"detail": message}, status_code=400)(scope, receive, send)


def origin_of(value: str) -> tuple[str, str, int] | None:
    """An Origin header (or an allow-list entry) as (scheme, host, port), the host as `host_of` gives it; None
    when it names no web site ("null", another scheme, a path)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = host_of(parts.hostname or "")
    if scheme not in DEFAULT_PORTS or host is None or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    return scheme, host, port or DEFAULT_PORTS[scheme]


def allowed_origins_from_env() -> list[str]:
    return [o for o in os.environ.get(ALLOWED_ORIGINS_ENV, "").split(",") if o.strip()]


class SameSite:
    """Answers 403 to a request that a page on another site made the browser send (cross-site request forgery).

    Cross-site: an `Origin` that is not this server (the scheme aside: a proxy may end TLS) nor an allowed origin,
    or `Sec-Fetch-Site: cross-site` without an allowed origin. A link followed from another site (a GET that opens
    a page, `Sec-Fetch-Mode: navigate`) still opens: the other site reads nothing back. A request with neither
    header (curl, scripts) is not a browser's and is accepted. "*" allows every origin.
    """

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in [o.strip() for o in origins]
        self.origins = {found for o in origins if (found := origin_of(o)) is not None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = None if self.any or scope["type"] != "http" else self.cross_site(scope)
        if reason is None:
            await self.app(scope, receive, send)
            return
        message = (f"refused: {reason}; another site's pages may not use this server unless it is listed with "
                   f"--allowed-origin or in {ALLOWED_ORIGINS_ENV}")
        await JSONResponse({"detail": message}, status_code=403)(scope, receive, send)

    def cross_site(self, scope: Scope) -> str | None:
        """Why the request is cross-site, or None."""
        headers = Headers(scope=scope)
        given = headers.get("origin")
        if given is not None:
            origin = origin_of(given)
            if origin is None:
                return f"the request's Origin {given[:100]!r} names no site"
            if origin in self.origins:
                return None
            here = headers.get("host", "")
            port = here.rsplit(":", 1)[1] if re.search(r":\d{1,5}$", here) else ""
            if (origin[1], origin[2]) != (host_of(here), int(port) if port else DEFAULT_PORTS[origin[0]]):
                return f"the request comes from a page on {given[:100]}"
        site = headers.get("sec-fetch-site", "").strip().lower()
        navigation = (scope["method"] in ("GET", "HEAD") and headers.get("sec-fetch-mode", "").lower() == "navigate"
                      and headers.get("sec-fetch-dest", "document").lower() == "document")
        if site == "cross-site" and not navigation:
            return "the request comes from a page on another site (Sec-Fetch-Site: cross-site)"
        return None


class HeadAsGet:
    """Answers HEAD on every route that answers GET: as the GET, without its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class NoSniff:
    """Every answer says `X-Content-Type-Options: nosniff`: a browser takes its type as given (JSON stays JSON)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, with_header)
