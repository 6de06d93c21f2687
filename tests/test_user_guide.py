"""``docs/user-guide.md``, run for real on the example folder.

The commands are read from the guide's fenced blocks, so the guide and this test cannot drift:
``examples/make_shapes.py`` writes a fresh copy of the example folder into ``tmp_path``; every
``python -m train`` line (data, fit, sweep, promote, import) runs through the CLI's ``main`` with
overrides that keep MLflow, checkpoints, statistics and the BentoML store inside ``tmp_path``; the
``make serve`` line becomes the ``bentoml serve`` its make target runs; and the curl and Python
client blocks are run against that server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import bentoml
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from common.model_format import LABEL_ALIAS, LABEL_NAME
from serving.bentoml_bridge import model_store_at
from tests.serving_helpers import bentoml_serve, run_ok
from train.__main__ import main
from train.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "user-guide.md"
EXAMPLE = ROOT / "examples" / "shapes"
SHAPES = ["circle", "square", "triangle"]
PYTHON = ".venv/bin/python"
GUIDE_URL = "http://127.0.0.1:3000"


def guide_blocks(language: str) -> list[str]:
    """The guide's fenced ``language`` blocks, in order."""
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def guide_commands() -> list[list[str]]:
    """Every command line of the guide's bash blocks, split as the shell would (no comments)."""
    return [
        words
        for block in guide_blocks("bash")
        for line in block.splitlines()
        if (words := shlex.split(line, comments=True))
    ]


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``NAME=value`` words as an environment, and the command after them."""
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words[0].split("=", 1)
        env[name] = value
        words = words[1:]
    return env, words


def test_example_folder_is_the_script_output(tmp_path: Path) -> None:
    """``examples/shapes`` is exactly what ``examples/make_shapes.py`` writes, and stays small."""
    made = tmp_path / "shapes"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_shapes.py"), str(made)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    committed = sorted(p.relative_to(EXAMPLE).as_posix() for p in EXAMPLE.rglob("*.png"))
    written = sorted(p.relative_to(made).as_posix() for p in made.rglob("*.png"))
    assert committed == written
    assert sorted({name.split("/")[0] for name in committed}) == SHAPES
    assert len(committed) == 12 * len(SHAPES)
    for name in committed:
        with Image.open(EXAMPLE / name) as ours, Image.open(made / name) as theirs:
            assert ours.mode == "L" and ours.size == (32, 32)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name
    assert sum(p.stat().st_size for p in EXAMPLE.rglob("*") if p.is_file()) < 200_000


def test_preset_keeps_away_from_the_fashion_champion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = load_settings()
    shapes = load_settings(ROOT / "configs" / "presets" / "shapes.yaml")
    assert shapes.data.source == "image_folder"
    assert shapes.data.path is not None and (ROOT / shapes.data.path) == EXAMPLE
    assert shapes.tracking.experiment_name != default.tracking.experiment_name
    assert shapes.tracking.registered_model_name != default.tracking.registered_model_name
    assert shapes.export.bento_model_name != default.export.bento_model_name
    assert shapes.data.stats_path != default.data.stats_path
    # The preset excerpt the guide shows is the preset's own values.
    [excerpt] = guide_blocks("yaml")
    shown = yaml.safe_load(excerpt)
    preset = yaml.safe_load((ROOT / "configs" / "presets" / "shapes.yaml").read_text())
    for section, values in shown.items():
        for key, value in values.items():
            assert preset[section][key] == value, f"{section}.{key}"


@pytest.mark.slow
def test_user_guide_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FASHION_SERVE_CONFIG_DIR", raising=False)
    for name in list(os.environ):
        if name.startswith(("FASHION_SERVE__", "FASHION_SERVE_SERVING__")):
            monkeypatch.delenv(name)
    commands = guide_commands()

    # The example folder, written by the guide's command into tmp_path.
    [make_shapes] = [w for w in commands if w[:2] == [PYTHON, "examples/make_shapes.py"]]
    shapes = tmp_path / "shapes"
    subprocess.run(
        [sys.executable, *make_shapes[1:], str(shapes)],
        check=True,
        capture_output=True,
        timeout=120,
    )

    # data → fit → sweep → promote → import, as the guide has them, kept inside tmp_path.
    home = tmp_path / "bentoml"
    isolated = [
        f"data.path={json.dumps(str(shapes))}",
        f"data.stats_path={json.dumps(str(tmp_path / 'stats.json'))}",
        f"tracking.store_dir={json.dumps(str(tmp_path / 'mlflow'))}",
        f"train.checkpoint_dir={json.dumps(str(tmp_path / 'checkpoints'))}",
        "train.progress=false",
    ]
    train_commands = [w[3:] for w in commands if w[:3] == [PYTHON, "-m", "train"]]
    assert [c[0] for c in train_commands] == ["data", "fit", "sweep", "promote", "import"]
    outputs: dict[str, str] = {}
    for argv in train_commands:
        with model_store_at(home):  # what BENTOML_HOME=<home> does for a fresh process
            status = main([*argv, *isolated])
        captured = capsys.readouterr()
        assert status == 0, f"{argv}: {captured.err[-2000:]}"
        outputs[argv[0]] = captured.out
    assert "36 images, 3 classes" in outputs["data"]
    assert re.search(r"val_accuracy=\d\.\d{4} test_accuracy=", outputs["fit"])
    assert len(re.findall(r"val_accuracy=", outputs["sweep"])) == 2
    assert "shapes-classifier@champion: unset -> version 1" in outputs["promote"]
    assert "imported shapes-classifier:" in outputs["import"]

    # The BentoML model carries the shapes classes; the Fashion-MNIST names were never touched.
    with model_store_at(home):
        stored = bentoml.models.get("shapes-classifier:latest")
        names = [m.tag.name for m in bentoml.models.list()]
    assert stored.info.metadata["class_names"] == SHAPES
    preprocess: Any = stored.info.metadata["preprocess"]
    assert (preprocess["image_size"], preprocess["channels"]) == (32, 1)
    assert stored.info.labels[LABEL_NAME] == "shapes-classifier"
    assert stored.info.labels[LABEL_ALIAS] == "champion"
    assert names == ["shapes-classifier"]
    registered = {m.name for m in MlflowClient().search_registered_models()}
    assert registered == {"shapes-classifier"}

    # The guide's registry block: the registered pyfunc predicts from the store's URI alone.
    [registry_code] = [b for b in guide_blocks("python") if "mlflow.pyfunc" in b]
    registry_env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    lines = run_ok([sys.executable, "-c", registry_code], registry_env).stdout.splitlines()
    assert lines[0].split() == ["label", "confidence"] and len(lines) == 3
    assert all(line.split()[0] in SHAPES for line in lines[1:])

    # make serve → bentoml serve with the guide's environment; then the guide's curl and Python.
    [serve] = [w for w in commands if w[-2:] == ["make", "serve"]]
    serve_env, _ = split_env(serve)
    assert serve_env == {"FASHION_SERVE_SERVING__MODEL_NAME": "shapes-classifier"}
    env = {
        **os.environ,
        **serve_env,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "FASHION_SERVE_SERVING__WORKERS": "1",
    }
    with bentoml_serve(env, tmp_path / "server.log") as url:
        curls = [w for w in commands if w[0] == "curl"]
        assert len(curls) == 2
        for words in curls:
            out = run_ok([w.replace(GUIDE_URL, url) for w in words], timeout=60).stdout
            body = json.loads(out)
            answers = [body] if isinstance(body, dict) else body
            assert len(answers) == (1 if words[-1].endswith("/predict") else 2)
            for answer in answers:
                assert answer["label"] in SHAPES and list(answer["scores"]) == SHAPES
        [client_code] = [b for b in guide_blocks("python") if "SyncHTTPClient" in b]
        result = run_ok([sys.executable, "-c", client_code.replace(GUIDE_URL, url)], env)
        label, confidence, *_ = result.stdout.split()
        assert label in SHAPES and 0.0 < float(confidence) <= 1.0
