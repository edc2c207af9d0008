"""What keeps other web pages away from the API: the Host check and the JSON-only body.

A page on any site can make the visitor's browser send requests to a server on 127.0.0.1. Two things
stop it from using a keyless local server:

- The Host header must name this server. A page cannot choose the Host its requests carry, but it can
  point a name of its own at 127.0.0.1 (DNS rebinding) and then read the answers as same-origin; its
  requests still say `Host: its-own-name`. Accepted: the loopback names for a loopback bind, the bound
  address otherwise, any IP literal for a wildcard bind (0.0.0.0, ::; an IP is never a rebinding name),
  and the names given as `allowed_hosts` (`--allowed-hosts`; "*" accepts any, "*.example.com" a domain).
- The body must be `Content-Type: application/json`. A page may send text/plain to any origin without
  asking (a CORS "simple request"); JSON needs a preflight, which this server never grants.

Used by `app.py` as FastAPI dependencies and by `cli.py` for its no-key warning.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from fastapi import Request

from .protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    ip = _ip(host)
    return host.lower().rstrip(".") == "localhost" if ip is None else ip.is_loopback


def _normal(name: str) -> str:
    return name.strip().lower().rstrip(".").strip("[]")


class HostPolicy:
    """Which Host header names a server bound to `bind` answers to."""

    def __init__(self, bind: str, allowed: Iterable[str] = ()):
        self.names = {_normal(n) for n in allowed if n.strip()}
        self.any = "*" in self.names
        bind_ip = _ip(bind)
        self.any_ip = bind == "" or (bind_ip is not None and bind_ip.is_unspecified)
        self.names |= set(LOOPBACK_NAMES)  # a local client can always call it by its loopback name
        if not self.any_ip:
            self.names.add(_normal(bind))

    def allows(self, hostname: str | None) -> bool:
        if self.any:
            return True
        if not hostname:
            return False
        host = _normal(hostname)
        if host in self.names or (self.any_ip and _ip(host) is not None):
            return True
        return any(n.startswith("*.") and host.endswith(n[1:]) for n in self.names)

    def describe(self) -> str:
        shown = sorted(f"[{n}]" if ":" in n else n for n in self.names)
        return ", ".join(shown + (["any IP address"] if self.any_ip else []))

    async def check(self, request: Request) -> None:
        """A FastAPI dependency: 400 unless the Host header names this server."""
        header = request.headers.get("host")
        if not self.allows(request.url.hostname if header else None):
            name = request.url.hostname if header else None
            hint = f"; if clients reach this server by that name, start it with --allowed-hosts {name}" if name else ""
            raise ApiError(f"Host header {header!r} does not name this server (it answers to {self.describe()})"
                           + hint, code="invalid_host")


async def require_json(request: Request) -> None:
    """A FastAPI dependency: 415 unless the body is declared as JSON."""
    declared = request.headers.get("content-type")
    media = (declared or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(f"Content-Type must be application/json, got {declared!r}" if declared else
                       "Content-Type must be application/json; the request has none", status=415,
                       code="unsupported_media_type")
