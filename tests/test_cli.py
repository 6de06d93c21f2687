"""The CLI: each known failure is one ``error:`` line and exit status 2, before anything is written."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from train.__main__ import main
from train.config import Settings

MakeSettings = Callable[..., Settings]


def _args(settings: Settings) -> list[str]:
    return [
        f"data.path={settings.data.path}",
        f"data.stats_path={settings.data.stats_path}",
        f"tracking.store_dir={settings.tracking.store_dir}",
        f"train.checkpoint_dir={settings.train.checkpoint_dir}",
        "train.epochs=1",
        "model.name=simple_cnn",
        "model.width=4",
        "train.channels_last=false",
        "train.progress=false",
    ]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1
    return err_lines[0]


def test_unknown_architecture(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *_args(make_settings()), "model.name=vgg99"]) == 2
    line = _one_error_line(capsys)
    assert "unknown architecture 'vgg99'" in line and "simple_cnn" in line


def test_bad_value_names_the_key(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *_args(make_settings()), "train.lr=-1"]) == 2
    assert "train.lr" in _one_error_line(capsys)


def test_missing_data(
    make_settings: MakeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *_args(make_settings()), f"data.path={tmp_path / 'void'}"]) == 2
    assert "void" in _one_error_line(capsys)


def test_unreachable_server(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    settings = make_settings()
    assert main(["fit", *_args(settings)]) == 2
    assert "unreachable" in _one_error_line(capsys)
    assert not Path(settings.train.checkpoint_dir).exists()


def test_data_fit_promote_evaluate_report(
    make_settings: MakeSettings,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings()
    args = _args(settings)
    assert main(["data", *args]) == 0
    assert main(["fit", *args, "registry.floor=0.0"]) == 0
    assert "test_accuracy=" in capsys.readouterr().out
    assert main(["promote", *args, "registry.floor=0.0"]) == 0
    assert "fashion-classifier@champion: unset -> version 1" in capsys.readouterr().out
    assert main(["evaluate", *args]) == 0
    assert "test_accuracy=" in capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- model-table:start -->\nold\n<!-- model-table:end -->\n")
    monkeypatch.setattr("train.report.PROJECT_ROOT", tmp_path)
    monkeypatch.setattr("train.report.update_readme.__defaults__", (readme,))
    assert main(["fit", *args, "registry.floor=0.0", "model.width=8"]) == 0
    assert main(["report", *args]) == 0
    out = capsys.readouterr().out
    width = settings.model.width
    # One row per architecture and width: the narrower run is its own row, not a replacement.
    rows = [line for line in out.splitlines() if line.startswith("| simple_cnn |")]
    assert sorted(row.split("|")[2].strip() for row in rows) == sorted({str(width), "8"})
    assert f"| simple_cnn | {width} |" in readme.read_text() and "old" not in readme.read_text()


def test_promote_with_nothing_trained(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["promote", *_args(make_settings())]) == 2
    assert "no finished run" in _one_error_line(capsys)


def test_resume_with_nothing_to_resume(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *_args(make_settings()), "--resume"]) == 2
    assert "no checkpoint" in _one_error_line(capsys)
