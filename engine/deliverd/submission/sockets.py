"""The listening sockets bound outside the listeners: ports below 1024 bound as root before
the daemon becomes its own user, and every socket the SMTP workers accept on."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping

from deliverd.config.model import Listener

PRIVILEGED_PORTS = 1024


def bind_privileged(listeners: Iterable[Listener]) -> dict[tuple[str, int], socket.socket]:
    """Listening sockets for the listeners on ports below 1024, bound now (as root, before the
    process becomes its own user) for ``start_listeners(prebound=...)``. OSError if one
    cannot be bound; the ones already bound are closed."""
    return bind_listeners(x for x in listeners if x.port < PRIVILEGED_PORTS)


def bind_listeners(
    listeners: Iterable[Listener],
    prebound: Mapping[tuple[str, int], socket.socket] | None = None,
) -> dict[tuple[str, int], socket.socket]:
    """A listening socket for each listener: a duplicate of its ``prebound`` one, or bound
    now. OSError if one cannot be bound; the ones already made are closed. (The SMTP
    workers' sockets: the daemon binds them and every worker accepts on them.)"""
    bound: dict[tuple[str, int], socket.socket] = {}
    try:
        for listener in listeners:
            key = (listener.address, listener.port)
            if prebound is not None and key in prebound:
                bound[key] = prebound[key].dup()
                continue
            family, kind, proto, _, address = socket.getaddrinfo(
                listener.address, listener.port, type=socket.SOCK_STREAM,
                flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE,
            )[0]
            sock = socket.socket(family, kind, proto)
            bound[key] = sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound
