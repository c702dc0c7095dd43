"""Aborting a gloo collective from outside: shut down this rank's gloo TCP connections.

Gloo in torch 2.13 has no working abort (``ProcessGroup.abort()`` returns at once and the blocked
collective stays blocked, measured), and a survivor that is not next to a dead rank in gloo's ring
waits for the collective timeout. What does wake it is its connections closing, as when a peer
process exits: :meth:`GlooEndpoints.shut_down` shuts down this rank's gloo connections (those to
and from the group's listeners, found by address), so the blocked collective raises at once, and
every peer blocked on this rank raises in turn. The worker calls it from its out-of-band thread
(``ElasticWorker.abort_collectives``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

logger = logging.getLogger(__name__)


def tcp_listeners() -> set[tuple[str, int]]:
    """Addresses of this process's listening TCP sockets."""
    return {local for local, _, listening, _ in _tcp_sockets() if listening}


def _tcp_sockets():
    """(local address, peer address or None, listening, fd) of this process's TCP sockets; reads
    each through a duplicate descriptor, so nothing of the original changes."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue  # closed meanwhile, or not a socket Python can wrap
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            peer = None if listening else _address(sock.getpeername())
            yield _address(sock.getsockname()), peer, listening, int(name)
        except OSError:
            continue  # not connected (any more)
        finally:
            sock.close()


def _address(sockaddr) -> tuple[str, int]:
    host = sockaddr[0]
    return (host[7:] if host.startswith("::ffff:") else host), int(sockaddr[1])


_ANY_HOST = ("0.0.0.0", "::")


class GlooEndpoints:
    """Where this rank's gloo connections are. Gloo's TCP transport gives every rank one listener
    and connects each pair of ranks through one of the two listeners, so a connection belongs to
    the group when one end of it is a listener of the group's ranks."""

    def __init__(self, own: tuple[str, int], peers: set[tuple[str, int]]) -> None:
        self.own, self.peers = own, peers

    def owns(self, local: tuple[str, int], peer: tuple[str, int]) -> bool:
        """Whether a connection (local, peer) is one of the group's: accepted on this rank's
        listener, or made to a peer's (a listener bound to every interface matches by port)."""
        if local[1] == self.own[1] and self.own[0] in (local[0], *_ANY_HOST):
            return True
        return any(peer[1] == port and host in (peer[0], *_ANY_HOST) for host, port in self.peers)

    @classmethod
    def exchange(cls, store: Any, rank: int, world_size: int,
                 listeners_before: set[tuple[str, int]]) -> GlooEndpoints | None:
        """Find the listener that ``init_process_group`` opened and swap addresses through the
        group's store (a few small store calls); None when it cannot be told apart."""
        new = tcp_listeners() - listeners_before
        if len(new) != 1:
            logger.warning("abort path unavailable for this group: %d new listening sockets", len(new))
            return None
        own = next(iter(new))
        store.set(f"elastic/gloo_listener/{rank}", f"{own[0]} {own[1]}")
        peers = set()
        for r in range(world_size):
            if r != rank:
                host, port = store.get(f"elastic/gloo_listener/{r}").decode().split()
                peers.add((host, int(port)))
        return cls(own, peers)

    def shut_down(self) -> int:
        """shutdown(2) both directions of every gloo connection; returns how many. The listener
        itself stays (gloo's accept loop treats a shut listener as fatal)."""
        shut = 0
        for local, peer, listening, fd in list(_tcp_sockets()):
            if listening or peer is None or not self.owns(local, peer):
                continue
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                shut += 1
            except OSError:
                pass  # already closed by the peer
            finally:
                sock.close()
        return shut
