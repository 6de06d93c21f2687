"""Integration: a tiny training and promotion against a real ``mlflow server`` process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from train.config import Settings
from train.pipeline import run_fit
from train.registry import promote

MakeSettings = Callable[..., Settings]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"mlflow server did not start: {err[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_fit_and_promote_against_a_real_server(
    make_settings: MakeSettings, mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    settings = make_settings("registry.floor=0.0")
    outcome = run_fit(settings)
    promotion = promote(settings)
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    version = client.get_model_version_by_alias(settings.tracking.registered_model_name, "champion")
    assert version.run_id == outcome.run_id == promotion.champion_run
    # Artifacts went to the server's store, not the embedded one.
    assert list((tmp_path / "server-artifacts").rglob("confusion_matrix.png"))
    assert not (Path(str(settings.tracking.store_dir)) / "mlflow.db").exists()
