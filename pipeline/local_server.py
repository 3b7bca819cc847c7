"""Host and Origin checks for the project's local web servers (the chat server, the review page).

A page the user has open elsewhere can send requests to a server on their machine: a site whose name resolves
to 127.0.0.1 (DNS rebinding) or a cross-site form post. A server that answers only requests whose ``Host``
names it, and browsers' requests whose ``Origin`` is its own, gives such pages nothing.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import hdrs, web

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_port(value: str) -> tuple[str, int | None] | None:
    """(lower-case name, port or None) of a Host header's value; None when it is malformed."""
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname, parts.port) if parts.hostname else None
    except ValueError:
        return None


def known_host(request: web.Request, allowed: frozenset[str]) -> bool:
    """Whether the Host header names this server: the address and port it was reached at (on loopback,
    localhost by any of its names), or a name in ``allowed``."""
    host = host_port(request.headers.get(hdrs.HOST, ""))
    if host is None:
        return False
    if "*" in allowed or host[0] in allowed:
        return True
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    try:
        local = ipaddress.ip_address(sockname[0])
    except (TypeError, ValueError):
        return False
    local = getattr(local, "ipv4_mapped", None) or local
    names = {str(local)} | (LOOPBACK_NAMES if local.is_loopback else set())
    return host[0] in names and (host[1] or 80) == sockname[1]


def same_origin(origin: str, request: web.Request, allowed: frozenset[str]) -> bool:
    """Whether a browser's ``Origin`` is this server: the name and port the Host header names (a Host without
    a port has the origin scheme's default), or a name in ``allowed`` (a proxy that rewrites Host)."""
    try:
        parts = urlsplit(origin)
        default = {"http": 80, "https": 443}.get(parts.scheme)
        port = parts.port or default
    except ValueError:
        return False
    if default is None or not parts.hostname:
        return False  # "null" (sandboxed frames, files) and other schemes
    if parts.hostname in allowed:
        return True
    host = host_port(request.headers.get(hdrs.HOST, ""))
    return host is not None and host[0] == parts.hostname and (host[1] or default) == port
