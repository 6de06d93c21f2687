"""Sweep: the grid, the random sample, the budget, and trials as ordinary tagged runs."""

from __future__ import annotations

from collections.abc import Callable

import mlflow

from train.config import Settings
from train.sweep import plan_trials, run_sweep

MakeSettings = Callable[..., Settings]


def test_grid_and_random_plans(make_settings: MakeSettings) -> None:
    grid = make_settings(
        "sweep.architectures=[simple_cnn,resnet_small]", "sweep.lrs=[0.1,0.01]", "sweep.max_runs=10"
    )
    trials = plan_trials(grid)
    assert len(trials) == 4
    assert {t.architecture for t in trials} == {"simple_cnn", "resnet_small"}
    sampled = make_settings(
        "sweep.strategy=random", "sweep.lrs=[0.1,0.01,0.001]", "sweep.max_runs=2", "sweep.seed=1"
    )
    first, second = plan_trials(sampled), plan_trials(sampled)
    assert first == second and len(first) == 2


def test_sweep_runs_trials_until_the_budget(make_settings: MakeSettings) -> None:
    settings = make_settings(
        "sweep.architectures=[simple_cnn]",
        "sweep.lrs=[0.1,0.05,0.01]",
        "sweep.max_runs=3",
        "sweep.time_budget_minutes=0.0001",
        "sweep.overrides={train.epochs: 1}",
    )
    results = run_sweep(settings)
    assert len(results) == 1  # the budget stops it after the first trial
    run = mlflow.get_run(results[0][1].run_id)
    assert "sweep_id" in run.data.tags
    assert run.data.params["train.lr"] == "0.1"


def test_sweep_runs_every_trial_within_budget(make_settings: MakeSettings) -> None:
    settings = make_settings(
        "sweep.architectures=[simple_cnn]", "sweep.lrs=[0.1,0.05]", "sweep.overrides={}"
    )
    results = run_sweep(settings)
    assert [r[0].lr for r in results] == [0.1, 0.05]


def test_trials_are_nested_under_one_parent_run(make_settings: MakeSettings) -> None:
    settings = make_settings(
        "sweep.architectures=[simple_cnn]",
        "sweep.lrs=[0.1,0.05]",
        "sweep.optimizers=[sgd,adamw]",
        "sweep.max_runs=3",
        "sweep.overrides={train.epochs: 1}",
    )
    results = run_sweep(settings)
    assert len(results) == 3
    parents = {mlflow.get_run(o.run_id).data.tags.get("mlflow.parentRunId") for _, o in results}
    (parent_id,) = parents
    assert parent_id is not None
    parent = mlflow.get_run(parent_id)
    best = max(results, key=lambda r: r[1].val_accuracy)[1]
    assert parent.data.tags["sweep_best_run_id"] == best.run_id
    assert parent.data.metrics["sweep_best_val_accuracy"] == best.val_accuracy
    assert parent.data.metrics["sweep_trials"] == 3
    assert parent.data.params["sweep.optimizers"] == "['sgd', 'adamw']"
    # promote ranks by best_val_accuracy with a model: the parent holds neither.
    assert "best_val_accuracy" not in parent.data.metrics
    assert {mlflow.get_run(o.run_id).data.params["train.optimizer"] for _, o in results} == {
        "sgd",
        "adamw",
    }
