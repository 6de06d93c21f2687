"""Start a real ``bentoml serve service:Classifier`` for HTTP tests (what ``make serve`` runs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def bentoml_serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """``bentoml serve service:Classifier`` (what ``make serve`` runs) on a free port; its URL.

    The service's log files go next to ``log`` unless ``env`` says otherwise (not the checkout).
    """
    port = free_port()
    env = {
        "FASHION_SERVE_SERVING__LOGGING__FILE__PATH": str(log.parent / "service.{worker}.jsonl"),
        "FASHION_SERVE_SERVING__LOGGING__PREDICTIONS__PATH": str(
            log.parent / "predictions.{worker}.jsonl"
        ),
        **env,
    }
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    command = [str(bentoml_cli), "serve", "service:Classifier", "--host", "127.0.0.1"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready in {READY_TIMEOUT_S}s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
