"""Promote: best run by metric, ties to the smaller model, floor, aliases, idempotence."""

from __future__ import annotations

import json
from collections.abc import Callable

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from common.preprocess import PreprocessSpec
from train import tracking
from train.__main__ import main
from train.config import ModelConfig, Settings
from train.models import build_model
from train.registry import PromotionError, candidates, promote, promote_version

MakeSettings = Callable[..., Settings]


def _logged_run(settings: Settings, metric: float, width: int, finished: bool = True) -> str:
    """A run with the registry metric and a small logged model, as ``fit`` leaves it."""
    experiment_id = tracking.connect(settings.tracking)
    model = build_model(ModelConfig(name="simple_cnn", width=width), PreprocessSpec(), 3)
    run = mlflow.start_run(experiment_id=experiment_id)
    mlflow.log_metrics(
        {
            "best_val_accuracy": metric,
            "parameters": float(sum(p.numel() for p in model.parameters())),
        }
    )
    tracking.log_model(
        model,
        ["a", "b", "c"],
        PreprocessSpec(),
        np.zeros((1, 28, 28, 1), np.uint8),
        torch.__version__,
        settings.export,
    )
    mlflow.end_run(status="FINISHED" if finished else "FAILED")
    return str(run.info.run_id)


def test_promote_picks_best_sets_aliases_and_is_idempotent(make_settings: MakeSettings) -> None:
    settings = make_settings()
    low = _logged_run(settings, 0.90, width=4)
    best = _logged_run(settings, 0.95, width=4)
    _logged_run(settings, 0.99, width=4, finished=False)  # failed runs never win
    first = promote(settings)
    assert first.champion_run == best
    assert first.previous_champion_version is None
    client = MlflowClient()
    name = settings.tracking.registered_model_name
    assert client.get_model_version_by_alias(name, "champion").run_id == best
    assert client.get_model_version_by_alias(name, "challenger").run_id == low
    assert first.describe("champion").startswith(
        f"{name}@champion: unset -> version {first.champion_version} (run {best}, "
        "best_val_accuracy 0.9500)"
    )

    again = promote(settings)
    assert again.champion_version == first.champion_version
    assert f"version {first.champion_version} (unchanged)" in again.describe("champion")
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_ties_go_to_the_smaller_model(make_settings: MakeSettings) -> None:
    settings = make_settings()
    _logged_run(settings, 0.93, width=8)
    small = _logged_run(settings, 0.93, width=4)
    ranked = candidates(settings)
    assert ranked[0].run_id == small
    assert promote(settings).champion_run == small


def test_a_new_best_moves_the_champion(make_settings: MakeSettings) -> None:
    settings = make_settings()
    _logged_run(settings, 0.90, width=4)
    before = promote(settings)
    newer = _logged_run(settings, 0.97, width=4)
    after = promote(settings)
    assert after.champion_run == newer
    assert after.previous_champion_version == before.champion_version
    assert after.challenger_version == before.champion_version
    assert f"version {before.champion_version} -> {after.champion_version}" in after.describe(
        "champion"
    )


def test_floor_refuses_and_leaves_the_registry_alone(make_settings: MakeSettings) -> None:
    settings = make_settings("registry.floor=0.9")
    _logged_run(settings, 0.80, width=4)
    with pytest.raises(PromotionError, match="under the floor"):
        promote(settings)
    client = MlflowClient()
    assert client.search_registered_models() == []


def test_nothing_to_promote(make_settings: MakeSettings) -> None:
    with pytest.raises(PromotionError, match="no finished run"):
        promote(make_settings())


def test_promote_version_rolls_the_champion_back(make_settings: MakeSettings) -> None:
    settings = make_settings()
    old = _logged_run(settings, 0.90, width=4)
    first = promote(settings)
    new = _logged_run(settings, 0.97, width=4)
    second = promote(settings)
    assert (first.champion_version, second.champion_version) == ("1", "2")
    client = MlflowClient()
    name = settings.tracking.registered_model_name

    back = promote_version(settings, "1")
    assert client.get_model_version_by_alias(name, "champion").run_id == old
    assert back.describe("champion") == (
        f"{name}@champion: version 2 -> 1 (run {old}, best_val_accuracy 0.9000)"
    )
    # The challenger is left alone; the floor does not apply to a chosen version.
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert promote_version(settings, "2").champion_run == new
    assert "version 2 (unchanged)" in promote_version(settings, "2").describe("champion")


def test_promote_version_through_the_cli(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    _logged_run(settings, 0.90, width=4)
    _logged_run(settings, 0.97, width=4)
    args = [f"tracking.store_dir={json.dumps(str(settings.tracking.store_dir))}"]
    assert main(["promote", *args]) == 0  # best -> version 1, runner-up -> version 2
    assert "@champion: unset -> version 1" in capsys.readouterr().out
    assert main(["promote", "--version", "2", *args]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{settings.tracking.registered_model_name}@champion: version 1 -> 2 "
        f"(run {MlflowClient().get_model_version(settings.tracking.registered_model_name, '2').run_id}, "
        "best_val_accuracy 0.9000)"
    )
    for unknown in ("7", "two"):
        assert main(["promote", "--version", unknown, *args]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert len(err.strip().splitlines()) == 1
        assert err.startswith("error: ")
        assert "registered: 1, 2" in err or "not 'two'" in err
    client = MlflowClient()
    name = settings.tracking.registered_model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
