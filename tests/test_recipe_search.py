"""The recipe search (``bench/recipe_search.py``): recipe files, selection, pricing, tiny real runs.

The runs train width-4 models for one epoch on 20 real Fashion-MNIST images per class (the
project's loader and split), on the CPU: in this process, and through the command line with
``--parallel 2`` (spawned workers). ``--no-channels-last`` there: torch 2.14.1 on CPU corrupts
the heap in the backward pass of resnet_small's channels_last 1x1 stride-2 conv at width 4.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import recipe_search
from bench.recipe_search import Recipe, RecipeError, RecipeResult
from tests.serving_helpers import run_ok

ROOT = Path(__file__).resolve().parent.parent
RESULT_KEYS = {
    *Recipe.model_fields,
    "device",
    "device_name",
    "val_curve_pct",
    "val_accuracy_pct",
    "test_accuracy_pct",
    "seconds",
    "images_trained",
    "train_images",
    "cpu_images_per_s",
    "cpu_hours",
}
TINY = """\
recipes:
  - {name: tiny_res, model: resnet_small, width: 4, epochs: 1, batch_size: 32,
     crop_padding: 2, erase_probability: 0.5}
  - {name: tiny_cnn, model: simple_cnn, width: 4, epochs: 2, batch_size: 32, lr: 0.05}
"""
QUICK = ["--device=cpu", "--limit-per-class=20", "--no-channels-last"]


@pytest.fixture
def tiny_recipes(tmp_path: Path) -> Path:
    path = tmp_path / "recipes.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(autouse=True)
def _project_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's configs/ as they are: no settings from the environment."""
    monkeypatch.delenv("FASHION_SERVE_CONFIG_DIR", raising=False)
    for name in list(os.environ):
        if name.startswith("FASHION_SERVE__"):
            monkeypatch.delenv(name)


def _check_result(line: dict[str, Any], recipe: Recipe) -> None:
    assert set(line) == RESULT_KEYS
    assert {k: line[k] for k in Recipe.model_fields} == recipe.model_dump()
    assert line["device"] == "cpu"
    assert len(line["val_curve_pct"]) == recipe.epochs
    assert all(0.0 <= v <= 100.0 for v in line["val_curve_pct"])
    assert line["val_accuracy_pct"] == line["val_curve_pct"][-1]
    assert 0.0 <= line["test_accuracy_pct"] <= 100.0
    # 20 per class, 10% of each class held out for validation: 18 × 10 training images.
    assert line["train_images"] == 180
    assert line["images_trained"] == 180 * recipe.epochs
    assert line["seconds"] > 0


# --------------------------------------------------------------------------- recipe files


def test_the_shipped_recipes_load() -> None:
    recipes = recipe_search.load_recipes(recipe_search.DEFAULT_RECIPES)
    assert [r.name for r in recipes] == [
        "w32_flip_15",
        "w32_pad2_erase_18",
        "deep24_pad2_erase_22",
        "deep32_pad2_erase_40_b256",
        "deep24_pad2_erase_13",
        "w24_flip_27",
    ]
    best = {r.name: r for r in recipes}["deep32_pad2_erase_40_b256"]
    assert (best.model, best.width, best.epochs, best.batch_size, best.lr) == (
        "resnet_small_deep",
        32,
        40,
        256,
        0.2,
    )
    assert (best.crop_padding, best.erase_probability, best.val_fraction) == (2, 0.5, 0.1)
    assert best.augmentation().hflip
    assert best.model_settings().flip_tta
    assert best.train_settings().label_smoothing == 0.1
    text = recipe_search.DEFAULT_RECIPES.read_text()
    assert text.count("measured on an NVIDIA H200 with the scratch predecessor") == 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "recipe file not found"),
        ("recipes: [", "not valid YAML"),
        ("- name: a", "must hold a mapping"),
        ("recipes: []", "'recipes' must be a non-empty list"),
        ("recipe: [{name: a, epochs: 1}]", "unknown top-level key(s) recipe"),
        ("recipes: [3]", "recipe #1 must be a mapping"),
        (
            "recipes: [{name: a, epochs: 1, model: vgg}]",
            "recipe 'a': model: Value error, unknown model 'vgg'",
        ),
        (
            "recipes: [{name: a, epochs: 0}]",
            "recipe 'a': epochs: Input should be greater than or equal to 1",
        ),
        ("recipes: [{name: a}]", "recipe 'a': epochs: Field required"),
        ("recipes: [{name: a, epochs: 1, blocks: [1, 2, 2]}]", "recipe 'a': blocks: Extra inputs"),
        ("recipes: [{epochs: 1}]", "recipe #1: name: Field required"),
        ("recipes: [{name: a, epochs: 1}, {name: a, epochs: 2}]", "duplicate recipe name(s) a"),
    ],
)
def test_bad_recipe_files_are_one_line_errors(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "recipes.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RecipeError) as info:
        recipe_search.load_recipes(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_selection_by_name(tiny_recipes: Path) -> None:
    recipes = recipe_search.load_recipes(tiny_recipes)
    assert recipe_search.select(recipes, []) == recipes
    assert [r.name for r in recipe_search.select(recipes, ["tiny_cnn"])] == ["tiny_cnn"]
    chosen = recipe_search.select(recipes, ["tiny_cnn", "tiny_res", "tiny_cnn"])
    assert [r.name for r in chosen] == ["tiny_cnn", "tiny_res"]
    with pytest.raises(
        RecipeError, match=r"unknown recipe\(s\) nope \(known: tiny_res, tiny_cnn\)"
    ):
        recipe_search.select(recipes, ["tiny_res", "nope"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--recipes", "{missing}"],
        ["--recipes", "{tiny}", "--only", "tiny_res,nope"],
        ["--recipes", "{bad_model}"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], tiny_recipes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_model = tmp_path / "bad.yaml"
    bad_model.write_text("recipes: [{name: a, epochs: 1, model: resnet_tiny}]")
    paths = {"missing": tmp_path / "nope.yaml", "tiny": tiny_recipes, "bad_model": bad_model}
    code = recipe_search.main([a.format(**paths) for a in argv] + ["--device=cpu"])
    out, err = capsys.readouterr()
    assert code == recipe_search.EXIT_USAGE
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device=cuda"], "error: --device is cuda but no CUDA device is available (torch "),
        (
            ["--device=cpu", "--precision=bf16"],
            "error: --precision is bf16 but training runs on the CPU: mixed precision",
        ),
        (["--device=auto", "--precision=fp16"], "error: --precision is fp16 but training runs"),
    ],
)
def test_device_and_precision_errors_are_train_s_one_line_exit_2(
    argv: list[str],
    message: str,
    tiny_recipes: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--device`` goes through ``train.device.resolve_device``, the resolver of ``train``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recipe_search.main(["--recipes", str(tiny_recipes), *argv]) == recipe_search.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(message) and err.count("\n") == 1
    assert recipe_search.resolve_device("auto") == torch.device("cpu")


# --------------------------------------------------------------------------- CPU price


def test_cpu_price_arithmetic_and_measurement() -> None:
    assert recipe_search.projected_cpu_hours(10, 54_000, 1500.0) == pytest.approx(0.1)
    assert recipe_search.projected_cpu_hours(40, 54_000, 600.0) == pytest.approx(1.0)
    assert recipe_search.projected_cpu_hours(1, 10, 0.0) == float("inf")
    recipe = Recipe(name="r", model="simple_cnn", width=4, epochs=15, batch_size=16)
    priced = RecipeResult(recipe, train_images=54_000, cpu_images_per_s=450.0)
    assert priced.cpu_hours == pytest.approx(0.5)
    assert priced.as_json()["cpu_hours"] == 0.5
    assert RecipeResult(recipe, train_images=54_000).cpu_hours is None
    threads = torch.get_num_threads()
    speed = recipe_search.measure_cpu_throughput(recipe, steps=2, warmup=1, channels_last=True)
    assert 0 < speed < float("inf")
    assert torch.get_num_threads() == threads
    other = recipe.model_copy(update={"name": "s", "epochs": 3, "lr": 0.01})
    assert recipe_search.throughput_key(other) == recipe_search.throughput_key(recipe)
    assert recipe_search.throughput_key(other.model_copy(update={"width": 8})) != (
        recipe_search.throughput_key(recipe)
    )


# --------------------------------------------------------------------------- tiny real runs


def test_tiny_run_in_process(
    tiny_recipes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One recipe, one epoch: a JSON line, a priced Markdown row."""
    output = tmp_path / "out" / "recipes.md"
    argv = ["--recipes", str(tiny_recipes), "--only=tiny_res", *QUICK]
    argv += ["--cpu-throughput", "--throughput-steps=1", f"--output={output}"]
    assert recipe_search.main(argv) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    recipe = recipe_search.load_recipes(tiny_recipes)[0]
    _check_result(line, recipe)
    assert line["cpu_images_per_s"] > 0
    expected = recipe_search.projected_cpu_hours(1, 180, line["cpu_images_per_s"])
    assert line["cpu_hours"] == pytest.approx(expected, abs=1e-3)
    page = output.read_text()
    assert page.startswith("# Recipe search\n")
    rows = [row for row in page.splitlines() if row.startswith("| tiny_")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:10] == [
        "tiny_res",
        "resnet_small",
        "4",
        "1",
        "32",
        "0.1",
        "0.0005",
        "0.1",
        "2",
        "0.5",
    ]
    assert float(cells[10]) == line["val_accuracy_pct"]
    assert float(cells[11]) == line["test_accuracy_pct"]
    assert cells[13] == "CPU"


def test_parallel_two_through_the_command_line(tiny_recipes: Path, tmp_path: Path) -> None:
    """``--parallel 2``: both recipes in spawned workers, a JSON line each, both in the table."""
    output = tmp_path / "recipes.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_SERVE_")}
    command = [sys.executable, "-m", "bench.recipe_search", "--recipes", str(tiny_recipes)]
    result = run_ok([*command, *QUICK, "--parallel=2", f"--output={output}"], env)
    lines = {d["name"]: d for d in map(json.loads, result.stdout.splitlines())}
    recipes = {r.name: r for r in recipe_search.load_recipes(tiny_recipes)}
    assert set(lines) == set(recipes)
    for name, line in lines.items():
        _check_result(line, recipes[name])
        assert line["cpu_hours"] is None
    assert "Traceback" not in result.stderr
    assert "tiny_cnn: epoch 2/2 val" in result.stderr
    rows = [
        row.split("|")[1].strip() for row in output.read_text().splitlines() if "| tiny_" in row
    ]
    assert rows == ["tiny_res", "tiny_cnn"]  # file order, whatever finished first


def test_price_only_prices_without_training(
    tiny_recipes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--recipes", str(tiny_recipes), "--only=tiny_cnn", "--device=cpu"]
    argv += ["--limit-per-class=20", "--price-only", "--throughput-steps=1"]
    assert recipe_search.main(argv) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["test_accuracy_pct"] is None and line["images_trained"] == 0
    assert line["train_images"] == 180
    assert line["cpu_hours"] == pytest.approx(2 * 180 / line["cpu_images_per_s"] / 3600, abs=1e-3)


def test_a_failing_recipe_is_a_json_line_and_exit_1(
    tiny_recipes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data missing: each recipe reports its error, the run goes on and ends with exit code 1."""
    output = tmp_path / "recipes.md"
    argv = ["--recipes", str(tiny_recipes), *QUICK, f"--data={tmp_path / 'empty'}"]
    assert recipe_search.main([*argv, f"--output={output}"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [line["name"] for line in lines] == ["tiny_res", "tiny_cnn"]
    assert all(line["error"].startswith("DataError: configured data.path") for line in lines)
    assert "## Failures\n\n- tiny_res: DataError" in output.read_text()
