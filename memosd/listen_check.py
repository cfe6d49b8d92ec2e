"""Is a listen address free? Asked before the daemon loads anything.

Loading the embedder, the store and the model takes seconds to minutes; a port that is already taken
(a second memosd, usually) must be reported before that, not after it, and in words that name the address
and what changes it. The real bind happens later (gRPC binds when the server is made, metrics when its
server is made); this probe only moves the common failure to the front. A port taken in between still
fails at the real bind, with the same words.
"""

from __future__ import annotations

import errno
import socket


def _reason(error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return "the address is already in use (another memosd, or another program, listens there)"
    if error.errno == errno.EADDRNOTAVAIL:
        return "no network interface of this machine has that address"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return error.strerror or str(error)


def _try_bind(family: int, sockaddr: tuple[object, ...]) -> OSError | None:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the real servers do: a port whose old connections linger in TIME_WAIT is free, one with a
        # listener is not (Linux refuses that bind even with SO_REUSEADDR).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as error:
            return error
    return None


def unbindable(listen: str, *, first_only: bool = False) -> str | None:
    """Why ``listen`` ("host:port", IPv6 bracketed) cannot be bound now, or None when it can.

    A host may resolve to several addresses ("localhost": 127.0.0.1 and ::1). By default the answer is
    whether ANY of them binds (gRPC serves on those it can bind); ``first_only`` asks about the first one
    only, the one the metrics server binds. Port 0 is always free.
    """
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"the host does not resolve ({error.strerror})"
    if first_only:
        infos = infos[:1]
    first_error: OSError | None = None
    for family, _type, _proto, _name, sockaddr in infos:
        refused = _try_bind(family, sockaddr)
        if refused is None:
            return None
        first_error = first_error or refused
    return _reason(first_error) if first_error is not None else "the host resolves to no address"
