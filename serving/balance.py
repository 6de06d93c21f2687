"""Spread keep-alive connections over the worker processes.

BentoML's workers accept from one shared listening socket, and whichever worker wakes first
accepts every connection that is waiting: a client that opens its connections together (a
connection pool, a load balancer, ``wrk``) can land all of them on one worker while the others
idle, which halves a 2-core machine's throughput. Each worker therefore publishes how many
connections it serves (the client addresses it answered within the last ``window_s``) in a
small shared file; a worker serving ``margin`` or more connections than the least busy one
answers with ``Connection: close``, and the client's reconnect is most likely accepted by the
idle worker, which is the one waiting in ``accept``.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Hashable
from pathlib import Path

#: Bytes per worker slot (one signed 64-bit count).
SLOT = 8


class RecentClients:
    """The client connections (addresses) a worker answered within the last ``window_s``.

    HTTP/1.1 connections carry one request at a time, so this is also the most requests that
    can be in flight together in the worker: with one client nothing can join a batch.
    """

    def __init__(self, window_s: float = 0.5) -> None:
        """Remember each client for ``window_s`` seconds after its last answer."""
        self.window_s = window_s
        self._last_seen: dict[Hashable, float] = {}
        self._pruned = 0.0

    def note(self, client: Hashable) -> int:
        """Note an answer to ``client``; how many clients were answered within the window."""
        now = time.monotonic()
        seen = self._last_seen
        seen[client] = now
        if now - self._pruned > self.window_s / 2:
            self._pruned = now
            for old in [c for c, t in seen.items() if now - t > self.window_s]:
                del seen[old]
        return len(seen)

    def forget(self, client: Hashable) -> None:
        """``client``'s connection is closing."""
        self._last_seen.pop(client, None)

    def __len__(self) -> int:
        """How many clients were answered within the window (at the last :meth:`note`)."""
        return len(self._last_seen)


class ConnectionBalance:
    """This worker's slot among every worker's count of connections."""

    def __init__(
        self,
        path: Path,
        workers: int,
        index: int,
        margin: int,
        clients: RecentClients | None = None,
    ) -> None:
        """Open (or create) the shared file at ``path``; ``index`` is this worker's slot (0-based).

        ``clients``: the worker's recent clients (the gate shares them with the batcher).
        """
        if not 0 <= index < workers:
            raise ValueError(f"worker slot {index} is outside 0..{workers - 1}")
        self.index = index
        self.margin = margin
        self.clients = clients if clients is not None else RecentClients()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < workers * SLOT:
                os.ftruncate(fd, workers * SLOT)
            self._map = mmap.mmap(fd, workers * SLOT)
        finally:
            os.close(fd)
        self._counts = memoryview(self._map).cast("q")
        self._counts[index] = 0

    @classmethod
    def for_worker(
        cls,
        directory: str | None,
        workers: int,
        worker_index: int | None,
        margin: int,
        clients: RecentClients | None = None,
    ) -> ConnectionBalance | None:
        """The balance of a BentoML worker (1-based ``worker_index``), or ``None`` where there is
        nothing to balance: one worker, no worker index, or no per-server directory."""
        if workers < 2 or margin < 1 or worker_index is None or not directory:
            return None
        path = Path(directory) / "fashion_serve_connections"
        return cls(path, workers, worker_index - 1, margin, clients)

    def should_close(self, client: Hashable) -> bool:
        """Note a request from ``client`` (its address); whether to close its connection now.

        True when this worker serves ``margin`` or more connections than the least busy one;
        the connection then stops counting here.
        """
        served = self.clients.note(client)
        counts = self._counts
        if served - min(counts) >= self.margin:
            self.clients.forget(client)
            counts[self.index] = served - 1
            return True
        counts[self.index] = served
        return False
