"""Rollback end to end: a real MLflow registry, two versions, ``promote --version 1``, served v1.

v1 and v2 are registered (each by ``promote`` after its run) and imported; the server reports
version 2 on ``GET /model``; then ``python -m train promote --version 1`` and ``import`` (the
CLI, in-process) and a restarted server reports version 1 and answers v1's scores, not v2's.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch

from serving.bentoml_bridge import model_store_at
from tests.conftest import MakeSettings
from tests.serving_helpers import TINY_CLASSES, TINY_SPEC, bentoml_serve, serve_env, tiny_model
from tests.test_faults import image, scores_of, served_scores
from train import tracking
from train.__main__ import main
from train.config import Settings

pytestmark = pytest.mark.slow


def logged_run(settings: Settings, metric: float, model: torch.nn.Module) -> str:
    """A finished run with the registry metric and ``model`` logged, as ``fit`` leaves it."""
    experiment_id = tracking.connect(settings.tracking)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metrics({"best_val_accuracy": metric, "parameters": 1000.0})
        example = np.zeros((1, 28, 28, 1), np.uint8)
        tracking.log_model(
            model, TINY_CLASSES, TINY_SPEC, example, torch.__version__, settings.export
        )
    return str(run.info.run_id)


def cli_args(settings: Settings) -> list[str]:
    """Overrides that point the CLI at the test's registry and tiny data set."""
    return [
        f"tracking.store_dir={json.dumps(str(settings.tracking.store_dir))}",
        f"data.path={json.dumps(str(settings.data.path))}",
        f"data.debian_path={json.dumps(str(settings.data.debian_path))}",
        "data.allow_download=false",
        "export.parity_batch=8",
    ]


def model_json(url: str) -> dict[str, str]:
    response = httpx.get(f"{url}/model", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, str] = response.json()
    return body


def test_rollback_serves_the_older_version(
    make_settings: MakeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    args = cli_args(settings)
    home = tmp_path / "bentoml"
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    data = image()
    old_scores, new_scores = scores_of(old, data), scores_of(new, data)
    assert max(abs(a - b) for a, b in zip(old_scores, new_scores, strict=True)) > 1e-3

    # v1: trained, promoted, imported; then v2 beats it: promoted, imported.
    run_v1 = logged_run(settings, 0.90, old)
    with model_store_at(home):  # what BENTOML_HOME=<home> does for a fresh process
        assert main(["promote", *args]) == 0
        assert main(["import", *args]) == 0
        run_v2 = logged_run(settings, 0.97, new)
        assert main(["promote", *args]) == 0
        assert main(["import", *args]) == 0
    assert "@champion: version 1 -> 2" in capsys.readouterr().out

    env = serve_env(home, workers=1)
    with bentoml_serve(env, tmp_path / "v2.log") as url:
        served = model_json(url)
        assert (served["version"], served["alias"], served["run_id"]) == ("2", "champion", run_v2)
        assert served_scores(url, data) == pytest.approx(new_scores, abs=1e-5)

    # Roll back: the champion alias to version 1, import, restart.
    with model_store_at(home):
        assert main(["promote", "--version", "1", *args]) == 0
        out = capsys.readouterr().out
        assert f"fashion-classifier@champion: version 2 -> 1 (run {run_v1}" in out
        assert main(["import", *args]) == 0
        imported = capsys.readouterr().out
    with bentoml_serve(env, tmp_path / "v1.log") as url:
        served = model_json(url)
        assert (served["registered_model"], served["version"]) == ("fashion-classifier", "1")
        assert (served["alias"], served["run_id"]) == ("champion", run_v1)
        assert f"imported {served['bento_tag']}" in imported
        scores = served_scores(url, data)
        assert scores == pytest.approx(old_scores, abs=1e-5)
        assert scores != pytest.approx(new_scores, abs=1e-5)
    # Nothing stored was lost: v1's first import, v2's, and v1's current import.
    assert len(list((home / "models" / "fashion-classifier").glob("*/model.yaml"))) == 3
