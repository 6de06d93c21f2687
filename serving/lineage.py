"""Which BentoML model is served, and where it came from: the one resolver everything uses.

What is served is the *current import of the configured alias*: among the store's entries of
``model_name`` (``configs/serving.yaml``), the newest whose ``alias`` label is ``model_alias``.
``python -m train import`` saves a fresh entry whenever the alias's newest entry is not already
the version the alias points at, so a rollback (``promote --version N`` then ``import``) makes
version N's entry the newest of the alias again. ``model_tag`` pins an explicit entry instead.

A store whose entries carry no alias label at all (imported before lineage labels, or a test
model) serves ``<model_name>:latest`` as before; a store with labelled entries but none of the
configured alias is an error rather than a silent choice.

Public BentoML API only (``bentoml.models.list``, labels, ``creation_time``): the store is the one
BentoML resolves (``BENTOML_HOME``, or a bento's own store inside a container).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import bentoml
from bentoml.exceptions import NotFound

from common.model_format import (
    BATCH_PROFILE,
    LABEL_ALIAS,
    LABEL_COMMIT,
    LABEL_NAME,
    LABEL_RUN,
    LABEL_VERSION,
)
from serving.schema import ModelInfo
from serving.settings import ServingSettings


class ServedModelError(LookupError):
    """The store has no entry for the configured alias; the message says what to run."""


def newest_for_alias(models: Iterable[bentoml.Model], alias: str) -> bentoml.Model | None:
    """The most recently created entry imported through ``alias``, if any.

    Ties on ``creation_time`` (same microsecond) go to the larger BentoML version string, so the
    answer never depends on the store's listing order.
    """
    matching = [m for m in models if m.info.labels.get(LABEL_ALIAS) == alias]
    if not matching:
        return None
    return max(matching, key=lambda m: (m.creation_time, str(m.tag.version)))


def choose_served(models: Iterable[bentoml.Model], name: str, alias: str) -> str:
    """The tag to serve among ``models`` (the entries of ``name``); see the module docstring.

    Raises:
        ServedModelError: entries carry alias labels, but none is ``alias``.
    """
    entries = list(models)
    newest = newest_for_alias(entries, alias)
    if newest is not None:
        return str(newest.tag)
    labelled = sorted({m.info.labels[LABEL_ALIAS] for m in entries if LABEL_ALIAS in m.info.labels})
    if labelled:
        raise ServedModelError(
            f"no {name} model in the BentoML store was imported through @{alias} (found: "
            f"{', '.join('@' + a for a in labelled)}); run `python -m train import`, or set "
            "model_alias / model_tag in configs/serving.yaml"
        )
    return f"{name}:latest"


def store_entries(name: str) -> list[bentoml.Model]:
    """Every entry of ``name`` in BentoML's store (none when the name is unknown)."""
    try:
        return list(bentoml.models.list(name))
    except NotFound:
        return []


def served_tag(settings: ServingSettings) -> str:
    """The tag the service loads: ``model_tag`` when pinned, else the alias's current import.

    Raises:
        ServedModelError: see :func:`choose_served`.
    """
    if settings.model_tag:
        return settings.model_tag
    return choose_served(
        store_entries(settings.model_name), settings.model_name, settings.model_alias
    )


def model_info(stored: bentoml.Model) -> ModelInfo:
    """``GET /model``'s answer for a stored model: its labels and recorded lineage."""
    labels = stored.info.labels
    metadata = stored.info.metadata
    lineage = cast(dict[str, Any], metadata.get("lineage") or {})
    metrics = cast(dict[str, Any], lineage.get("metrics") or {})
    return ModelInfo(
        registered_model=labels.get(LABEL_NAME) or lineage.get("registered_name"),
        version=labels.get(LABEL_VERSION) or lineage.get("version"),
        alias=labels.get(LABEL_ALIAS) or lineage.get("alias"),
        run_id=labels.get(LABEL_RUN) or lineage.get("run_id"),
        bento_tag=str(stored.tag),
        imported_at=stored.creation_time.isoformat(),
        git_commit=labels.get(LABEL_COMMIT) or lineage.get("git_commit"),
        metrics={str(k): float(v) for k, v in metrics.items()},
        class_names=[str(n) for n in cast(list[Any], metadata.get("class_names") or [])],
    )


def profiled_costs(metadata: Mapping[str, Any]) -> dict[int, float] | None:
    """The batch profile in a stored model's metadata: milliseconds per image by batch size."""
    profile = cast(dict[str, Any], metadata.get(BATCH_PROFILE) or {})
    costs = cast(dict[str, float], profile.get("ms_per_image") or {})
    return {int(size): float(cost) for size, cost in costs.items()} or None
