"""Start the FastAPI peer (``bench/peer_fastapi.py``) like ``uvicorn --workers N``, minus a stall.

``python -m bench.peer_serve --host H --port P --workers N`` is ``uvicorn
bench.peer_fastapi:app --workers N --no-access-log`` with one difference: the listening socket
gets ``TCP_NODELAY``. uvicorn creates its multi-worker socket with protocol 0, and asyncio only
sets ``TCP_NODELAY`` on accepted connections of a socket whose protocol is TCP, so every response
(headers and body in two writes) waits for the client's delayed ACK: measured 52 ms p50 at
concurrency 1 with 2 workers against 16 ms with 1. Linux copies the option from the listener to
the connections it accepts. Without this the benchmark would measure a socket quirk, not the
peer's design.

``--reuse-port`` (the floor, ``bench/asgi_floor.py``) gives each worker a listening socket of its
own on the same port (``SO_REUSEPORT``), so the kernel spreads connections over the workers by
their addresses. With one shared socket, ``wrk``'s connections, opened together, can all land on
the worker that happens to be in ``accept``, and the floor then measures one core, not the
least a Python ASGI server costs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import socket
import sys
import threading
from collections.abc import Sequence

import uvicorn
from uvicorn.supervisors import Multiprocess

#: Seconds a worker has to stop after SIGTERM before it is killed (--reuse-port).
STOP_TIMEOUT_S = 10.0


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP listener as uvicorn binds one, plus ``TCP_NODELAY`` (and ``SO_REUSEPORT``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve(config: uvicorn.Config, sock: socket.socket) -> None:
    uvicorn.Server(config).run(sockets=[sock])


def serve_reuse_port(config: uvicorn.Config, workers: int) -> int:
    """One process per worker, each on its own ``SO_REUSEPORT`` socket; stop them on SIGTERM.

    Every socket listens before any worker starts, so no connection can go to a worker that is
    not there yet. Returns 0 after SIGTERM/SIGINT, 1 when a worker died on its own.
    """
    sockets = [listening_socket(config.host, config.port, True) for _ in range(workers)]
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_serve, args=(config, sock)) for sock in sockets]
    for child in children:
        child.start()
    for sock in sockets:
        sock.close()  # each child holds its own
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.is_set() and all(child.is_alive() for child in children):
        stop.wait(0.2)
    for child in children:
        child.terminate()  # SIGTERM: uvicorn finishes its requests
    for child in children:
        child.join(STOP_TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join()
    return 0 if stop.is_set() else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve the peer until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m bench.peer_serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--app", default="bench.peer_fastapi:app", help="also bench.asgi_floor:app (the floor)"
    )
    parser.add_argument(
        "--reuse-port", action="store_true", help="a listening socket per worker (SO_REUSEPORT)"
    )
    args = parser.parse_args(argv)
    config = uvicorn.Config(
        args.app,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )
    if args.reuse_port:
        return serve_reuse_port(config, args.workers)
    sock = listening_socket(args.host, args.port, reuse_port=False)
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        _serve(config, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
