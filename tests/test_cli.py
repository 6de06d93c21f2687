"""The CLI: each known failure is one ``error:`` line and exit status 2, before anything is written."""

from __future__ import annotations

import argparse
import shlex
import socket
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

import train.__main__ as train_main
from tests.conftest import cli_overrides
from train.__main__ import _parser, main
from train.config import Settings

MakeSettings = Callable[..., Settings]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1
    return err_lines[0]


def test_unknown_architecture(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *cli_overrides(make_settings()), "model.name=vgg99"]) == 2
    line = _one_error_line(capsys)
    assert "unknown architecture 'vgg99'" in line and "simple_cnn" in line


def test_bad_value_names_the_key(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *cli_overrides(make_settings()), "train.lr=-1"]) == 2
    assert "train.lr" in _one_error_line(capsys)


def test_missing_data(
    make_settings: MakeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *cli_overrides(make_settings()), f"data.path={tmp_path / 'void'}"]) == 2
    assert "void" in _one_error_line(capsys)


def test_unreachable_server(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    settings = make_settings()
    assert main(["fit", *cli_overrides(settings)]) == 2
    assert "unreachable" in _one_error_line(capsys)
    assert not Path(settings.train.checkpoint_dir).exists()


def test_data_fit_promote_evaluate_report(
    make_settings: MakeSettings,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings()
    args = cli_overrides(settings)
    assert main(["data", *args]) == 0
    assert main(["fit", *args, "registry.floor=0.0"]) == 0
    out = capsys.readouterr().out
    assert "test_accuracy=" in out
    # Where to see the run: the embedded store, which plain `mlflow ui` would not open.
    (see,) = [line for line in out.splitlines() if "--backend-store-uri" in line]
    assert shlex.split(see)[-1] == settings.tracking.embedded_uri()
    assert main(["promote", *args, "registry.floor=0.0"]) == 0
    assert "fashion-classifier@champion: unset -> version 1" in capsys.readouterr().out
    assert main(["evaluate", *args]) == 0
    assert "test_accuracy=" in capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- model-table:start -->\nold\n<!-- model-table:end -->\n")
    monkeypatch.setattr("train.report.PROJECT_ROOT", tmp_path)
    monkeypatch.setattr("train.report.update_readme.__defaults__", (readme,))
    assert main(["fit", *args, "registry.floor=0.0", "model.width=8"]) == 0
    # A run of another experiment named in tracking.report_experiments (an image folder's).
    with mlflow.start_run(experiment_id=mlflow.create_experiment("folder-runs")):
        mlflow.log_params({"data.source": "image_folder", "data.path": "/data/my_photos"})
        mlflow.set_tag("architecture", "resnet18")
        mlflow.log_metrics({"best_val_accuracy": 0.5, "test_accuracy": 0.4})
    assert main(["report", *args, "tracking.report_experiments=[folder-runs,absent]"]) == 0
    out = capsys.readouterr().out
    width = settings.model.width
    # One row per architecture and width: the narrower run is its own row, not a replacement.
    rows = [line for line in out.splitlines() if line.startswith("| Fashion-MNIST | simple_cnn |")]
    assert sorted(row.split("|")[3].strip() for row in rows) == sorted({str(width), "8"})
    assert f"| simple_cnn | {width} |" in readme.read_text() and "old" not in readme.read_text()
    # Weights and training-set size tell a transfer-learning or subset run from a full one.
    assert all(row.split("|")[4].strip() == "random" for row in rows)
    assert all(row.split("|")[5].strip().replace(",", "").isdigit() for row in rows)
    # The folder's run is named by its folder and comes after the Fashion-MNIST rows.
    table = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[-1].startswith("| my_photos | resnet18 |") and "| 40.00% |" in table[-1]


def test_promote_with_nothing_trained(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["promote", *cli_overrides(make_settings())]) == 2
    assert "no finished run" in _one_error_line(capsys)


def test_resume_with_nothing_to_resume(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", *cli_overrides(make_settings()), "--resume"]) == 2
    assert "no checkpoint" in _one_error_line(capsys)


# --------------------------------------------------------------------------- help, --config, Ctrl-C


def _command_names() -> list[str]:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(commands.choices)


COMMANDS = _command_names()


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMANDS)], ids=["top", *COMMANDS])
def test_help_is_plain_and_short(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _help(argv, capsys)
    # No reST markup and no module docstring: what a user reads, not what a developer wrote.
    assert "``" not in text and ":func:" not in text
    assert (train_main.__doc__ or "").splitlines()[0] not in text
    # A command's help says what it does before its options.
    description = text.split("\n\n")[1]
    assert description.strip()
    assert not description.startswith(("usage", "options", "positional"))
    # Short: one screen.
    assert len(text.splitlines()) <= 30


def test_top_help_lists_every_command_on_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    lines = _help([], capsys).splitlines()
    for name in COMMANDS:
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert len(line.split()) > 1  # its help is on the same line, not wrapped below


def test_config_before_or_after_the_command(tmp_path: Path) -> None:
    preset = tmp_path / "preset.yaml"
    before = _parser().parse_args(["--config", str(preset), "fit", "train.epochs=2"])
    after = _parser().parse_args(["fit", "--config", str(preset), "train.epochs=2"])
    neither = _parser().parse_args(["fit"])
    assert before.config == after.config == preset
    assert before.overrides == after.overrides == ["train.epochs=2"]
    assert neither.config is None


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_read_in_either_place(
    where: str,
    make_settings: MakeSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text("nonsense_section: {}\n")
    config = ["--config", str(preset)]
    argv = [*config, "data"] if where == "before" else ["data", *config]
    assert main([*argv, *cli_overrides(make_settings())]) == 2
    assert "nonsense_section" in _one_error_line(capsys)


def test_monitoring_commands_refuse_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "configs/presets/best.yaml", "alerts"])
    assert exit_info.value.code == 2
    assert "--alerts-config" in capsys.readouterr().err


def _interrupt(*_args: object, **_kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["before", "after"])
def test_ctrl_c_during_fit_suggests_resume_with_the_same_settings(
    where: str,
    make_settings: MakeSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("train.pipeline.run_fit", _interrupt)
    preset = tmp_path / "preset.yaml"
    preset.write_text("train: {epochs: 1}\n")
    config = ["--config", str(preset)]
    args = cli_overrides(make_settings())
    argv = [*config, "fit", *args] if where == "before" else ["fit", *config, *args]
    assert main(argv) == 130
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("interrupted")]
    hint = shlex.split(line.split(": ", 1)[1])
    assert hint[:4] == ["python", "-m", "train", "fit"] and "--resume" in hint
    assert hint[hint.index("--config") + 1] == str(preset)
    assert hint[-len(args) - 1 : -1] == args
    # The hint parses back to the same command, resuming the latest run.
    again = _parser().parse_args(hint[3:])
    assert (again.command, again.config, again.resume, again.overrides) == (
        "fit",
        preset,
        "latest",
        args,
    )


@pytest.mark.parametrize(
    ("command", "target"),
    [
        ("sweep", "train.sweep.run_sweep"),
        ("data", "train.pipeline.run_data"),
        ("promote", "train.registry.promote"),
        ("alerts", "train.monitoring.run_alerts"),
    ],
)
def test_ctrl_c_elsewhere_does_not_suggest_resume(
    command: str,
    target: str,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(target, _interrupt)
    argv = [command] if command == "alerts" else [command, *cli_overrides(make_settings())]
    assert main(argv) == 130
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted")]
    assert "--resume" not in line
    assert f"train {command}" in line
