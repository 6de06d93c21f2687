"""Hyper-parameter sweep: architectures x learning rates x batch sizes x optimizers under a budget.

The sweep is one MLflow parent run (its grid as parameters, the best trial as metrics); each
trial is an ordinary ``fit`` run nested under it and tagged with the sweep id, so ``promote`` and
the experiments notebook treat trials like any other run.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from dataclasses import dataclass

import mlflow
from loguru import logger

from train.config import Settings
from train.device import resolve_placement
from train.pipeline import FitOutcome, run_fit
from train.tracking import connect, flatten


@dataclass(frozen=True)
class Trial:
    """One point of the grid."""

    architecture: str
    lr: float
    batch_size: int
    optimizer: str

    def overrides(self) -> dict[str, object]:
        return {
            "model.name": self.architecture,
            "train.lr": self.lr,
            "train.batch_size": self.batch_size,
            "train.optimizer": self.optimizer,
        }


def plan_trials(settings: Settings) -> list[Trial]:
    """The grid, or a seeded random sample of it, cut to ``max_runs``."""
    cfg = settings.sweep
    grid = [
        Trial(a, lr, bs, opt)
        for a, lr, bs, opt in itertools.product(
            cfg.architectures, cfg.lrs, cfg.batch_sizes, cfg.optimizers
        )
    ]
    if cfg.strategy == "random":
        random.Random(cfg.seed).shuffle(grid)
    return grid[: cfg.max_runs]


def _apply(settings: Settings, overrides: dict[str, object]) -> Settings:
    tree = settings.model_dump(mode="json")
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        tree[section][key] = value
    return Settings.model_validate(tree)


def run_sweep(settings: Settings) -> list[tuple[Trial, FitOutcome]]:
    """Run trials until done or until the next one would exceed the time budget."""
    budget_s = settings.sweep.time_budget_minutes * 60.0
    sweep_id = uuid.uuid4().hex[:8]
    trials = plan_trials(settings)
    base = _apply(settings, dict(settings.sweep.overrides))
    results: list[tuple[Trial, FitOutcome]] = []
    started = time.perf_counter()
    # A missing device stops the sweep before its parent run is written.
    resolve_placement(settings.train.device, settings.train.precision)
    experiment_id = connect(settings.tracking)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"sweep-{sweep_id}"):
        mlflow.set_tag("sweep_id", sweep_id)
        mlflow.log_params(flatten(settings.sweep.model_dump(mode="json"), "sweep."))
        for index, trial in enumerate(trials, start=1):
            elapsed = time.perf_counter() - started
            mean_trial = elapsed / len(results) if results else 0.0
            if results and elapsed + mean_trial > budget_s:
                logger.info("sweep {}: budget reached after {} trial(s)", sweep_id, len(results))
                break
            trial_settings = _apply(base, trial.overrides())
            logger.info("sweep {}: trial {}/{} {}", sweep_id, index, len(trials), trial)
            outcome = run_fit(trial_settings, run_name=f"sweep-{sweep_id}-{index}")
            mlflow.MlflowClient().set_tag(outcome.run_id, "sweep_id", sweep_id)
            results.append((trial, outcome))
        if results:
            # Not best_val_accuracy: promote ranks runs by it, and the parent holds no model.
            best = max(results, key=lambda r: r[1].val_accuracy)[1]
            mlflow.log_metrics(
                {
                    "sweep_best_val_accuracy": best.val_accuracy,
                    "sweep_trials": float(len(results)),
                    "sweep_minutes": (time.perf_counter() - started) / 60.0,
                }
            )
            mlflow.set_tag("sweep_best_run_id", best.run_id)
    return results
