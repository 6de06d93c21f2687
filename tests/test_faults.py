"""Faults: the pipeline and the service keep what they had and keep working.

Where each fault of the reliability issue is tested:

- ``kill -9`` during training, then ``--resume``: same MLflow run, at most one epoch twice,
  final metrics once: ``tests/test_pipeline.py::test_kill_9_during_training_then_resume_continues_the_same_run``
  (and ``tests/test_engine.py::test_resume_after_a_crash_matches_an_uninterrupted_run``).
- Tracking server unreachable: a clear error before training starts
  (``tests/test_pipeline.py::test_unreachable_tracking_server_fails_before_training``,
  ``tests/test_cli.py::test_unreachable_server``); nothing registered or imported, and a
  promotion cut off before its alias moves leaves the old champion: here.
- A corrupt or truncated checkpoint: a clear error naming the previous good checkpoint, which is
  kept: ``tests/test_engine.py::test_corrupt_checkpoint_names_the_file_and_the_fallback`` and
  ``::test_checkpoint_is_atomic_and_keeps_the_previous``.
- Promote and import while the service runs: the running service keeps its model, the new one is
  served after a restart: here.
- An import whose ONNX parity fails: refused, store unchanged:
  ``tests/test_export.py::test_parity_failure_stores_nothing``.
- A worker process killed under load: the server recovers and keeps answering: here.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from common.preprocess import prepare_image, softmax, to_model_input
from serving.bentoml_bridge import model_store_at
from tests.serving_helpers import (
    TINY_SPEC,
    bentoml_serve,
    free_port,
    import_tiny,
    serve_env,
    tiny_model,
)
from tests.test_registry import _logged_run
from train.config import Settings
from train.export import import_champion
from train.registry import promote
from train.tracking import TrackingError

MakeSettings = Callable[..., Settings]


def image() -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, size=(28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def scores_of(model: torch.nn.Module, data: bytes) -> list[float]:
    """The torch model's probabilities for ``data`` (what the served ONNX copy must answer)."""
    pixels = to_model_input([prepare_image(Image.open(io.BytesIO(data)), TINY_SPEC)])
    with torch.inference_mode():
        logits = model(torch.from_numpy(pixels)).numpy()
    return [float(p) for p in softmax(logits)[0]]


def served_scores(url: str, data: bytes) -> list[float]:
    response = httpx.post(
        f"{url}/predict", files={"image": ("x.png", data, "image/png")}, timeout=30
    )
    assert response.status_code == 200, response.text
    return list(response.json()["scores"].values())


# --------------------------------------------------------------------------- the service


@pytest.mark.slow
def test_import_while_serving_keeps_the_running_model_until_restart(tmp_path: Path) -> None:
    """``make import`` of a new champion beside a running server: the server's model stays."""
    home = tmp_path / "bentoml"
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    import_tiny(old, home, version="1")
    data = image()
    old_scores, new_scores = scores_of(old, data), scores_of(new, data)
    assert max(abs(a - b) for a, b in zip(old_scores, new_scores, strict=True)) > 1e-3
    env = serve_env(home, workers=1)
    with bentoml_serve(env, tmp_path / "first.log") as url:
        assert served_scores(url, data) == pytest.approx(old_scores, abs=1e-5)
        import_tiny(new, home, version="2")
        # The running workers hold the model they loaded; the store now also has version 2.
        for _ in range(5):
            assert served_scores(url, data) == pytest.approx(old_scores, abs=1e-5)
    with bentoml_serve(env, tmp_path / "second.log") as url:
        assert served_scores(url, data) == pytest.approx(new_scores, abs=1e-5)


def worker_pids(root: int) -> set[int]:
    """PIDs of the BentoML service workers below ``root`` (``_bentoml_impl.worker.service``)."""
    parents: dict[int, int] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        parents[int(name)] = int(raw[raw.rindex(")") + 2 :].split()[1])
    below, stack = set(), [root]
    while stack:
        pid = stack.pop()
        kids = [p for p, ppid in parents.items() if ppid == pid]
        below.update(kids)
        stack.extend(kids)
    workers = set()
    for pid in below:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"_bentoml_impl.worker.service" in cmdline:
            workers.add(pid)
    return workers


def server_root(url: str) -> int:
    """The PID of the ``bentoml serve`` process listening on ``url``'s port (from /proc)."""
    port = int(url.rsplit(":", 1)[1])
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            inodes.add(fields[9])
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{name}/fd/{fd}") for fd in os.listdir(f"/proc/{name}/fd")}
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            b"bentoml" in cmdline
            and b"serve" in cmdline
            and {f"socket:[{i}]" for i in inodes} & links
        ):
            return int(name)
    raise AssertionError(f"no bentoml serve process listens on port {port}")


@pytest.mark.slow
def test_a_worker_killed_under_load_is_replaced_and_answers_continue(tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    import_tiny(tiny_model(), home)
    data = image()
    with bentoml_serve(serve_env(home, workers=2), tmp_path / "server.log") as url:
        root = server_root(url)
        deadline = time.monotonic() + 60
        while len(before := worker_pids(root)) < 2:
            assert time.monotonic() < deadline, f"workers: {before}"
            time.sleep(0.2)
        results: list[tuple[float, int]] = []  # (time, status; 0 = connection error)
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=30) as session:
                while not stop.is_set():
                    try:
                        status = session.post(
                            "/predict", files={"image": ("x.png", data, "image/png")}
                        ).status_code
                    except httpx.HTTPError:
                        status = 0
                    results.append((time.monotonic(), status))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            victim = min(before)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            deadline = killed_at + 90
            while not ((now := worker_pids(root)) - before and len(now) == 2):
                assert time.monotonic() < deadline, f"no replacement worker: {now}"
                time.sleep(0.2)
            replaced_at = time.monotonic()
            time.sleep(3)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        before_kill = [s for t, s in results if t < killed_at]
        after_replacement = [s for t, s in results if t > replaced_at + 1]
        failed = [s for s in (s for _, s in results) if s != 200]
        assert before_kill and set(before_kill) == {200}
        assert after_replacement and set(after_replacement) == {200}
        # Only the requests in flight on the killed worker may fail (4 clients).
        assert len(failed) <= 4, failed
        assert victim not in worker_pids(root)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


# --------------------------------------------------------------------------- the registry


def test_unreachable_tracking_server_registers_and_imports_nothing(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = make_settings()
    _logged_run(settings, 0.95, width=4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match="unreachable"):
        promote(settings)
    with model_store_at(tmp_path / "bentoml"), pytest.raises(TrackingError, match="unreachable"):
        import_champion(settings)
    assert not list((tmp_path / "bentoml").glob("models/*/*"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert MlflowClient().search_registered_models() == []


def test_promotion_cut_off_before_the_alias_moves_keeps_the_champion(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes away after registering the new version: @champion still names the old."""
    settings = make_settings()
    _logged_run(settings, 0.90, width=4)
    first = promote(settings)
    better = _logged_run(settings, 0.97, width=4)
    name = settings.tracking.registered_model_name

    def server_gone(*args: object) -> None:
        raise MlflowException("API request failed: connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", server_gone)
        with pytest.raises(MlflowException, match="connection refused"):
            promote(settings)
    client = MlflowClient()
    assert (
        str(client.get_model_version_by_alias(name, "champion").version) == first.champion_version
    )
    retried = promote(settings)  # the server is back: the same new version, no duplicate
    assert retried.champion_run == better
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert client.get_model_version_by_alias(name, "champion").run_id == better
