"""Start the FastAPI peer (``bench/peer_fastapi.py``) like ``uvicorn --workers N``, minus a stall.

``python -m bench.peer_serve --host H --port P --workers N`` is ``uvicorn
bench.peer_fastapi:app --workers N --no-access-log`` with one difference: the listening socket
gets ``TCP_NODELAY``. uvicorn creates its multi-worker socket with protocol 0, and asyncio only
sets ``TCP_NODELAY`` on accepted connections of a socket whose protocol is TCP, so every response
(headers and body in two writes) waits for the client's delayed ACK: measured 52 ms p50 at
concurrency 1 with 2 workers against 16 ms with 1. Linux copies the option from the listener to
the connections it accepts. Without this the benchmark would measure a socket quirk, not the
peer's design.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

import uvicorn
from uvicorn.supervisors import Multiprocess


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve the peer until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m bench.peer_serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--app", default="bench.peer_fastapi:app", help="also bench.asgi_floor:app (the floor)"
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
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
