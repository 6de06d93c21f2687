"""Helpers for HTTP tests of the service: a tiny imported model and a real ``bentoml serve``.

Thin test-side names over the product helpers (:mod:`train.tiny`, :mod:`serving.launch`):
``tiny_model(seed)`` builds a random ``resnet_small`` (width 4, 3 classes), ``import_tiny(model,
home, version)`` stores it in the BentoML home ``home`` the way ``make import`` does, and
``serve_env(home, **settings)`` is the environment for ``bentoml_serve`` with
``FASHION_SERVE_SERVING__*`` overrides (``limits={"max_pixels": 10}`` becomes
``FASHION_SERVE_SERVING__LIMITS__MAX_PIXELS=10``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serving.launch import LOOPBACK, PROJECT_ROOT, ServeError, free_port, serve
from train.tiny import TINY_CLASSES, TINY_SPEC, import_tiny, tiny_model

__all__ = [
    "READY_TIMEOUT_S",
    "ROOT",
    "STOP_TIMEOUT_S",
    "TINY_CLASSES",
    "TINY_SPEC",
    "bentoml_serve",
    "free_port",
    "import_tiny",
    "run_ok",
    "serve_env",
    "tiny_bench_flags",
    "tiny_model",
]

ROOT = PROJECT_ROOT
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def run_ok(
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (in the project root by default), output as text; it must exit 0.

    A failure fails the test with the end of its stderr.
    """
    result = subprocess.run(
        list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_bench_flags(tmp_path: Path, output: str, *flags: str) -> list[str]:
    """Flags for a short ``bench`` run on ``--tiny``'s random model with one worker: ``flags``,
    the page written to ``tmp_path / output`` and the work files under ``tmp_path / "work"``."""
    return [
        "--tiny",
        "--workers=1",
        *flags,
        f"--output={tmp_path / output}",
        f"--work-dir={tmp_path / 'work'}",
    ]


def serve_env(home: Path, **settings: Any) -> dict[str, str]:
    """The environment for :func:`bentoml_serve`: the store at ``home`` plus serving overrides."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                flatten(f"{prefix}__{key.upper()}", inner)
        else:
            env[prefix] = str(value).lower() if isinstance(value, bool) else str(value)

    for key, value in settings.items():
        flatten(f"FASHION_SERVE_SERVING__{key.upper()}", value)
    return env


@contextmanager
def bentoml_serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """``bentoml serve service:Classifier`` (what ``make serve`` runs) on a free port; its URL.

    The service's log files go next to ``log`` unless ``env`` says otherwise (not the checkout).
    A server that exits or is not ready in :data:`READY_TIMEOUT_S` fails the test with its log.
    """
    env = {
        "FASHION_SERVE_SERVING__LOGGING__FILE__PATH": str(log.parent / "service.{worker}.jsonl"),
        "FASHION_SERVE_SERVING__LOGGING__PREDICTIONS__PATH": str(
            log.parent / "predictions.{worker}.jsonl"
        ),
        **env,
    }
    with ExitStack() as stack:
        try:
            url = stack.enter_context(serve(env, log, READY_TIMEOUT_S, STOP_TIMEOUT_S))
        except ServeError as exc:
            pytest.fail(f"bentoml serve did not start: {exc}")
        yield url


class QuietHandler(BaseHTTPRequestHandler):
    """A stub server's request handler that keeps the test output clean."""

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def stub_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a free loopback port in a thread; yields the base URL."""
    import threading

    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
