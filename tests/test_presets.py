"""Every shipped preset is a valid configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import PROJECT_ROOT, load_settings

PRESETS = sorted((PROJECT_ROOT / "configs" / "presets").glob("*.yaml"))


def test_there_are_presets() -> None:
    assert {p.stem for p in PRESETS} >= {"quick", "efficientnet_lite0"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads(preset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings(preset=preset)
    assert settings.model.name
