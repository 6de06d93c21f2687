"""Start ``bentoml serve service:Classifier`` and wait for ``/readyz``: the one way to do both.

Benchmarks (``bench/``), scripts (``scripts/container.py``) and the tests all start the service
or wait for it the same way, so they use this module. It needs neither torch nor pytest, and no
private BentoML name: the server is the ``bentoml`` command next to this interpreter, and the
model store it reads is ``BENTOML_HOME`` in the environment it is given (unset: BentoML's own,
``~/bentoml``).

- :func:`wait_ready` polls ``GET /readyz`` (or another readiness path) until 200 while the server
  (process or container) is alive; it returns the seconds since the start.
- :class:`Server` is one ``bentoml serve`` process (or another server, e.g. Prometheus, given its
  command, listen flags and readiness path) in its own process group: its URL, cold start, log
  tail, and a stop that always ends the whole group.
- :func:`serve` starts one on a free loopback port, waits until it is ready, yields its URL and
  always stops it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: The service ``bentoml serve`` runs (what ``make serve`` runs).
SERVICE = "service:Classifier"
LOOPBACK = "127.0.0.1"
#: The readiness path of the service (Prometheus and Alertmanager answer ``/-/ready``).
READY_PATH = "/readyz"
#: How often :func:`wait_ready` asks, and how long one ``/readyz`` request may take.
POLL_S = 0.1
PROBE_TIMEOUT_S = 2.0
#: :func:`free_port` picks among ports from here up to the kernel's ephemeral range (above the
#: usual fixed service ports such as 3000, 5000 and 9090).
FIXED_PORTS_FROM = 15000
FREE_PORT_TRIES = 50
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class ServeError(RuntimeError):
    """The server exited, or did not answer ``/readyz`` with 200 in time (the log tail says why)."""


def default_store_home(environ: Mapping[str, str] | None = None) -> Path:
    """The BentoML store ``bentoml`` commands use: ``$BENTOML_HOME``, else ``~/bentoml``."""
    env = os.environ if environ is None else environ
    return Path(env.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now, below the kernel's ephemeral range.

    A port from ``bind(host, 0)`` is free again once the probe closes, and the next ``bind(0)``
    may get it: BentoML's process manager took one for its control socket that way, so the
    server it was meant for failed with "Address already in use". Below the ephemeral range only
    a program that asks for the number gets it.
    """
    ephemeral_low = _ephemeral_range_start()
    if ephemeral_low is not None and ephemeral_low > FIXED_PORTS_FROM:
        candidates = range(FIXED_PORTS_FROM, ephemeral_low)
        for port in random.sample(candidates, min(FREE_PORT_TRIES, len(candidates))):
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _ephemeral_range_start() -> int | None:
    """The first port the kernel hands out for ``bind(0)`` and outgoing connections (Linux)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def bentoml_cli() -> str:
    """The ``bentoml`` command next to this interpreter."""
    return str(Path(sys.executable).parent / "bentoml")


def bentoml_command() -> list[str]:
    """``bentoml serve service:Classifier`` from this interpreter's environment."""
    return [bentoml_cli(), "serve", SERVICE]


def wait_ready(
    url: str,
    timeout_s: float,
    alive: Callable[[], bool],
    started: float | None = None,
    poll_s: float = POLL_S,
    path: str = READY_PATH,
) -> float:
    """Poll ``{url}{path}`` (``/readyz``) until it answers 200; the seconds since ``started``.

    Args:
        url: the server's base URL.
        timeout_s: how long after ``started`` to give up.
        alive: whether the server (a process, a container) is still running; asked between polls.
        started: ``time.monotonic()`` at the server's start (default: now).
        poll_s: seconds between polls.
        path: the readiness path.

    Raises:
        ServeError: the server stopped running, or was not ready in ``timeout_s``.
    """
    started = time.monotonic() if started is None else started
    deadline = started + timeout_s
    with httpx.Client(timeout=PROBE_TIMEOUT_S) as client:
        while True:
            try:
                if client.get(f"{url}{path}").status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if not alive():
                raise ServeError(f"the server at {url} exited before {path} answered 200")
            if time.monotonic() > deadline:
                raise ServeError(f"{path} at {url} did not answer 200 within {timeout_s:.0f} s")
            time.sleep(poll_s)


def host_port_flags(host: str, port: int) -> list[str]:
    """``--host HOST --port PORT``: how ``bentoml serve`` is told where to listen."""
    return ["--host", host, "--port", str(port)]


class Server:
    """A server process (by default ``bentoml serve service:Classifier``) in its own group.

    ``command`` gets ``listen(host, port)`` appended (``--host HOST --port PORT``) and must answer
    ``GET ready_path`` (``/readyz``); it runs in the project root with ``env`` (``BENTOML_HOME``
    there picks the store), its output in ``log``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        env: Mapping[str, str],
        log: Path,
        command: Sequence[str] | None = None,
        listen: Callable[[str, int], Sequence[str]] = host_port_flags,
        ready_path: str = READY_PATH,
    ) -> None:
        self.url = f"http://{host}:{port}"
        self.log = log
        self.ready_path = ready_path
        self.cold_start_s = float("nan")
        self.stopped: str | None = None
        command = list(command or bentoml_command())
        self.spawned = time.monotonic()
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [*command, *listen(host, port)],
                cwd=PROJECT_ROOT,
                env=dict(env),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def wait_ready(self, timeout_s: float) -> float:
        """Wait for ``ready_path`` (``/readyz``) = 200; the seconds since spawn (the cold start).

        Raises:
            ServeError: the process exited or was not ready in ``timeout_s`` (with the log tail).
        """
        try:
            self.cold_start_s = wait_ready(
                self.url, timeout_s, self.alive, self.spawned, path=self.ready_path
            )
        except ServeError as exc:
            raise ServeError(f"{exc}; log tail:\n{self.log_tail()}") from exc
        return self.cold_start_s

    def check_alive(self) -> None:
        """Raise :class:`ServeError` with the log tail if the server has exited."""
        if not self.alive():
            raise ServeError(
                f"server exited with {self.process.returncode}; log tail:\n" + self.log_tail()
            )

    def stop(self, timeout_s: float) -> str:
        """SIGTERM the process group, SIGKILL it after ``timeout_s``; say how it ended (once)."""
        if self.stopped is not None:
            return self.stopped
        if not self.alive():
            self.stopped = f"server had exited by itself ({self.process.returncode})"
            return self.stopped
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
            how = f"stopped by SIGTERM in {time.monotonic() - started:.1f}s"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            how = f"killed (SIGKILL) after {timeout_s:.0f}s without stopping on SIGTERM"
        # Workers may outlive the arbiter; the group is ours.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.stopped = how
        return how


@contextlib.contextmanager
def serve(
    env: Mapping[str, str],
    log: Path,
    ready_timeout_s: float,
    stop_timeout_s: float,
    port: int | None = None,
    host: str = LOOPBACK,
) -> Iterator[str]:
    """``bentoml serve service:Classifier`` on ``host`` (a free port unless ``port``); its URL.

    Yields once ``/readyz`` answers 200; the process group is stopped on every exit path.

    Raises:
        ServeError: the server exited or was not ready in ``ready_timeout_s``.
    """
    server = Server(host, port or free_port(host), env, log)
    try:
        server.wait_ready(ready_timeout_s)
        yield server.url
    finally:
        server.stop(stop_timeout_s)
