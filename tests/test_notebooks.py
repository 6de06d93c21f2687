"""Execute the notebooks headless on tiny generated data; the committed notebooks are never touched.

Each notebook is read from ``notebooks/``, executed with nbclient (kernel ``python3``, which runs the
interpreter executing the tests) and written to ``tmp_path``. Settings reach the kernel through
``FASHION_SERVE_NOTEBOOK_OVERRIDES`` (``section.key=value`` overrides for ``load_settings``); data
comes from the ``fmnist_dir`` fixture, and ``make_settings`` isolates the environment.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from train.config import Settings
from train.data import FASHION_MNIST_CLASSES
from train.sweep import run_sweep

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
OVERRIDES_ENV = "FASHION_SERVE_NOTEBOOK_OVERRIDES"
MakeSettings = Callable[..., Settings]  # the ``make_settings`` fixture of conftest.py

# nbformat ships type hints but leaves read/write unannotated.
_read_notebook: Callable[..., Any] = nbformat.read
_write_notebook: Callable[..., Any] = nbformat.write


def _set_overrides(monkeypatch: pytest.MonkeyPatch, *overrides: str) -> None:
    """Hand ``section.key=value`` overrides to the kernel, which inherits ``os.environ``.

    Call after ``make_settings`` has been requested: that fixture already removed
    ``MLFLOW_TRACKING_URI`` and every ``FASHION_SERVE__*`` variable from the environment.
    """
    monkeypatch.setenv(OVERRIDES_ENV, " ".join(shlex.quote(o) for o in overrides))


def _data_overrides(tmp_path: Path, fmnist_dir: Path) -> list[str]:
    """Point the notebook at the tiny data set and keep every store inside ``tmp_path``."""
    return [
        f"data.path={fmnist_dir}",
        f"data.debian_path={tmp_path / 'no-debian-fashion-mnist'}",
        "data.allow_download=false",
        f"tracking.store_dir={tmp_path / 'mlflow'}",
        f"train.checkpoint_dir={tmp_path / 'checkpoints'}",
    ]


def _execute(name: str, out_dir: Path) -> Any:
    """Run ``notebooks/<name>`` (cwd ``notebooks/``) and save the executed copy in ``out_dir``."""
    notebook = _read_notebook(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    _write_notebook(notebook, out_dir / name)
    return notebook


def _outputs(notebook: Any) -> tuple[str, list[str]]:
    """All textual output of the code cells, and the error outputs (``ename: evalue``)."""
    texts: list[str] = []
    errors: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                errors.append(f"{output.ename}: {output.evalue}")
            elif output.output_type == "stream":
                texts.append(str(output.text))
            else:
                data = output.get("data", {})
                texts.extend(
                    str(data[kind])
                    for kind in ("text/plain", "text/html", "text/markdown")
                    if kind in data
                )
    return "\n".join(texts), errors


def _image_count(notebook: Any) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )


# ``make_settings`` is requested for its side effect: it clears MLFLOW_TRACKING_URI and the
# FASHION_SERVE__* variables that the kernel would otherwise inherit.


def test_data_exploration_notebook(
    tmp_path: Path, fmnist_dir: Path, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_overrides(monkeypatch, *_data_overrides(tmp_path, fmnist_dir), "data.limit_per_class=8")
    notebook = _execute("01_data_exploration.ipynb", tmp_path)
    text, errors = _outputs(notebook)
    assert errors == []
    for class_name in FASHION_MNIST_CLASSES:
        assert class_name in text
    assert str(fmnist_dir) in text  # the override reached load_settings
    assert "exact duplicates" in text
    assert "AugmentationPreset(" in text
    # class distribution, samples, per-class mean images, histograms, augmentation preview
    assert _image_count(notebook) >= 5


def test_model_experiments_notebook_without_runs(
    tmp_path: Path, fmnist_dir: Path, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_overrides(monkeypatch, *_data_overrides(tmp_path, fmnist_dir))
    notebook = _execute("02_model_experiments.ipynb", tmp_path)
    text, errors = _outputs(notebook)
    assert errors == []
    assert str(tmp_path / "mlflow") in text  # the store override reached load_settings
    assert "0 run(s) in the experiment" in text
    assert "No finished training runs" in text
    assert _image_count(notebook) == 0


def test_model_experiments_notebook_with_runs(
    tmp_path: Path, fmnist_dir: Path, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mlflow.set_tracking_uri (inside run_fit) exports MLFLOW_TRACKING_URI to os.environ; record
    # the variable with monkeypatch so it is removed again after this test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # That export also makes connect() create the experiment without tracking.store_dir/artifacts,
    # so MLflow falls back to ./mlruns: keep it inside tmp_path, not the checkout.
    monkeypatch.chdir(tmp_path)
    settings = make_settings(
        "data.limit_per_class=6",
        "train.num_threads=1",
        # torch 2.14.1 CPU corrupted the heap in the backward pass of resnet_small at
        # width 4 (a 1x1 stride-2 conv with 4 input channels); width 8 trains safely.
        "model.width=8",
        "sweep.architectures=[simple_cnn,resnet_small]",
        "sweep.lrs=[0.1]",
        "sweep.optimizers=[sgd]",
        "sweep.overrides={}",
    )
    run_sweep(settings)  # two trials nested under one parent run

    _set_overrides(monkeypatch, *_data_overrides(tmp_path, fmnist_dir))
    notebook = _execute("02_model_experiments.ipynb", tmp_path)
    text, errors = _outputs(notebook)
    assert errors == []
    # Three runs: the sweep's parent (no model) and its two trials.
    assert "3 run(s) in the experiment, 2 finished with a logged model" in text
    for expected in ("simple_cnn", "resnet_small", "best_val_accuracy", "latency_ms"):
        assert expected in text
    assert "timed 2 of 2 model(s)" in text
    assert "could not time" not in text
    assert re.search(r"sweep [0-9a-f]{8}: 2 trial\(s\) nested under parent run", text)
    assert _image_count(notebook) == 2  # accuracy against cost, and the sweep


def test_run_notebooks_executes_in_place_and_refuses_a_failing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make notebooks``: outputs are written back; a failing cell overwrites nothing."""
    from scripts import run_notebooks

    monkeypatch.setattr(run_notebooks, "NOTEBOOKS", tmp_path)
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    new_notebook: Callable[..., Any] = nbformat.v4.new_notebook
    new_code_cell: Callable[..., Any] = nbformat.v4.new_code_cell
    _write_notebook(new_notebook(cells=[new_code_cell("print(6 * 7)")]), good)
    _write_notebook(new_notebook(cells=[new_code_cell("1 / 0")]), bad)
    before = bad.read_text()
    assert run_notebooks.main(["good.ipynb"]) == 0
    assert "42" in json.dumps(_read_notebook(good, as_version=4).cells[0].outputs)
    assert run_notebooks.main(["bad.ipynb"]) == 2
    assert "error: bad.ipynb: a cell failed" in capsys.readouterr().err
    assert bad.read_text() == before
    assert run_notebooks.main(["missing.ipynb"]) == 2
