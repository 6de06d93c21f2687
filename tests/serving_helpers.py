"""Helpers for HTTP tests of the service: a tiny imported model and a real ``bentoml serve``.

``tiny_model(seed)`` builds a random ``resnet_small`` (width 4, 3 classes), ``import_tiny(model,
home, version)`` stores it in the BentoML home ``home`` the way ``make import`` does, and
``serve_env(home, **settings)`` is the environment for ``bentoml_serve`` with
``FASHION_SERVE_SERVING__*`` overrides (``limits={"max_pixels": 10}`` becomes
``FASHION_SERVE_SERVING__LIMITS__MAX_PIXELS=10``).
"""

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
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from common.preprocess import PreprocessSpec, to_model_input
from serving.bentoml_bridge import model_store_at
from train.config import ExportConfig, ModelConfig
from train.export import import_to_bento
from train.models import build_model

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
TINY_CLASSES = ["shirt", "shoe", "bag"]
TINY_SPEC = PreprocessSpec()


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A random ``resnet_small`` (width 4) for :data:`TINY_CLASSES`, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="resnet_small", width=4), TINY_SPEC, len(TINY_CLASSES))
    return model.eval()


def import_tiny(model: torch.nn.Module, home: Path, version: str = "1") -> str:
    """Import ``model`` as registered version ``version`` through ``@champion`` into the BentoML
    home ``home`` (what ``make import`` does); its tag, the one the service then serves."""
    rng = np.random.default_rng(0)
    parity = to_model_input(list(rng.integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)))
    lineage = {
        "registered_name": "fashion-classifier",
        "version": version,
        "alias": "champion",
        "run_id": f"r{version}",
    }
    with model_store_at(home):
        tag = import_to_bento(model, TINY_CLASSES, TINY_SPEC, lineage, parity, ExportConfig())
    return str(tag)


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
