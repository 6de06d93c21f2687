"""Choose the best finished run, register it, and point the ``champion`` alias at it.

Selection: highest configured metric (validation accuracy by default); ties go to the model with
fewer parameters. The runner-up becomes ``challenger``. Anything under the floor is refused and
the registry is left as it was. Aliases, not the deprecated stages.

``promote --version N`` (:func:`promote_version`) points the champion at registered version N
instead, e.g. to roll back; it leaves the challenger alone and applies no floor (the operator
chose the version). Then ``python -m train import`` makes it the served model.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from train import tracking
from train.config import Settings


class PromotionError(RuntimeError):
    """Nothing can be promoted; the message says why."""


@dataclass
class Candidate:
    """A finished run with a logged model."""

    run_id: str
    run_name: str
    metric: float
    parameters: float
    model_uri: str


@dataclass
class Promotion:
    """What ``promote`` changed."""

    model_name: str
    champion_version: str
    champion_run: str
    metric: float | None
    previous_champion_version: str | None
    challenger_version: str | None
    metric_name: str = "metric"

    def describe(self, alias: str) -> str:
        """One line, e.g. ``fashion-classifier@champion: version 2 -> 1 (run abc, ...)``."""
        before = self.previous_champion_version
        if before == self.champion_version:
            change = f"version {before} (unchanged)"
        elif before is None:
            change = f"unset -> version {self.champion_version}"
        else:
            change = f"version {before} -> {self.champion_version}"
        detail = f"run {self.champion_run}"
        if self.metric is not None:
            detail += f", {self.metric_name} {self.metric:.4f}"
        line = f"{self.model_name}@{alias}: {change} ({detail})"
        if self.challenger_version:
            line += f"; challenger -> version {self.challenger_version}"
        return line


def candidates(settings: Settings) -> list[Candidate]:
    """Finished runs with a logged model and the metric, best first (ties: smaller model first)."""
    metric = settings.registry.metric
    runs = tracking.finished_runs(settings.tracking, settings.registry.max_runs)
    found = [
        Candidate(
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            metric=float(run.data.metrics[metric]),
            parameters=float(run.data.metrics.get("parameters", float("inf"))),
            model_uri=run.data.tags[tracking.MODEL_URI_TAG],
        )
        for run in runs
        if metric in run.data.metrics and tracking.MODEL_URI_TAG in run.data.tags
    ]
    return sorted(found, key=lambda c: (-round(c.metric, 6), c.parameters))


def _version_for(client: MlflowClient, name: str, candidate: Candidate) -> str:
    """The registered version of this run's model, registering it if it is not yet."""
    try:
        versions: list[ModelVersion] = client.search_model_versions(
            f"name = '{name}' and run_id = '{candidate.run_id}'"
        )
    except MlflowException:
        versions = []
    if versions:
        return str(max(int(v.version) for v in versions))
    version = mlflow.register_model(
        candidate.model_uri, name, tags={"run_name": candidate.run_name}
    )
    return str(version.version)


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(settings: Settings) -> Promotion:
    """Register the best run and move the aliases.

    Raises:
        PromotionError: no finished run with a model, or the best is under the floor.
    """
    reg = settings.registry
    ranked = candidates(settings)
    if not ranked:
        raise PromotionError(
            f"no finished run with a logged model and metric '{reg.metric}' in experiment "
            f"'{settings.tracking.experiment_name}'; train one with: python -m train fit"
        )
    best = ranked[0]
    if best.metric < reg.floor:
        raise PromotionError(
            f"best run {best.run_id} has {reg.metric}={best.metric:.4f}, under the floor "
            f"{reg.floor:.4f}; nothing was registered"
        )
    name = settings.tracking.registered_model_name
    client = MlflowClient()
    previous = _alias_version(client, name, reg.champion_alias)
    champion_version = _version_for(client, name, best)
    client.set_registered_model_alias(name, reg.champion_alias, champion_version)
    challenger_version: str | None = None
    runner_up = next((c for c in ranked[1:] if c.metric >= reg.floor), None)
    if runner_up is not None:
        challenger_version = _version_for(client, name, runner_up)
        client.set_registered_model_alias(name, reg.challenger_alias, challenger_version)
    return Promotion(
        name, champion_version, best.run_id, best.metric, previous, challenger_version, reg.metric
    )


def promote_version(settings: Settings, version: str) -> Promotion:
    """Point the champion alias at registered ``version`` (a rollback, or a chosen model).

    Raises:
        PromotionError: ``version`` is not a registered version of the model.
    """
    reg = settings.registry
    name = settings.tracking.registered_model_name
    tracking.connect(settings.tracking)
    if not version.isdigit():
        raise PromotionError(f"--version must be a registered version number, not {version!r}")
    client = MlflowClient()
    try:
        chosen = client.get_model_version(name, version)
    except MlflowException:
        known = _known_versions(client, name)
        raise PromotionError(
            f"{name} has no version {version} (registered: {known or 'none'})"
        ) from None
    previous = _alias_version(client, name, reg.champion_alias)
    client.set_registered_model_alias(name, reg.champion_alias, str(chosen.version))
    run_id = chosen.run_id or ""
    metric: float | None = None
    if run_id:
        try:
            metric = client.get_run(run_id).data.metrics.get(reg.metric)
        except MlflowException:
            metric = None
    return Promotion(name, str(chosen.version), run_id, metric, previous, None, reg.metric)


def _known_versions(client: MlflowClient, name: str) -> str:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return ""
    return ", ".join(str(v) for v in sorted(int(v.version) for v in versions))
