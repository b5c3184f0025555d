"""Listening sockets for every server the CLI starts: bound first, then announced.

A server binds its port before it starts anything else or says it started, so a port in use
is one clear error (:class:`ListenError`) instead of a traceback after a "started" line.
"""

from __future__ import annotations

import errno
import socket

BACKLOG = 1024


class ListenError(OSError):
    """The address cannot be listened on; ``str()`` is one line naming what and where."""


def describe(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listener(host: str, port: int, *, what: str, listen: bool = True) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one) for ``what``.

    ``SO_REUSEADDR`` lets a restarted server take its port back from connections in TIME_WAIT;
    it never lets two servers listen on one port (that is ``SO_REUSEPORT``, not set). With
    ``listen=False`` the port is only reserved: connections are refused, not left waiting,
    until the server starts serving (asyncio's ``create_server(sock=...)`` listens then).
    """
    where = describe(host or "0.0.0.0", port)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as error:
        raise ListenError(f"cannot listen on {where} for {what}: unknown host ({error})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
        sock.bind(address)
        if listen:
            sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {where} for {what}: {_reason(error)}") from None
    sock.setblocking(False)
    return sock


def _reason(error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return "the address is already in use (another process listens on that port)"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if error.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this machine's"
    return error.strerror or str(error)


__all__ = ["BACKLOG", "ListenError", "bind_listener", "describe"]
