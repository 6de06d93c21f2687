"""Recipe search: which training recipe reaches which Fashion-MNIST test accuracy, for how much compute.

``python -m bench.recipe_search [--recipes configs/recipes.yaml] [--only NAME,...]
[--device auto|cpu|cuda] [--precision fp32|bf16|fp16] [--parallel N] [--threads T] [--cpu-throughput] [--output FILE.md]``
(``make recipe-search`` runs every recipe of ``configs/recipes.yaml`` this way.)

A recipe (:class:`Recipe`, one entry of the recipe file) names an architecture of
``configs/model.yaml`` and its width, the epochs, batch size, peak learning rate, weight decay,
label smoothing, augmentation (padded random crop and random erasing; horizontal flips always)
and the validation share. Every recipe trains with the project's own pieces, nothing copied:

- data: the real Fashion-MNIST from :func:`train.data.load_data` with the project's data settings
  (``configs/data.yaml``: where the files are, ``split_seed`` for the stratified validation split;
  the recipe sets ``val_fraction``);
- model: :func:`train.models.build_model`, so the data's normalisation is inside the network and
  evaluation averages the mirror image (``flip_tta``), as the served model does;
- optimiser, schedule and loss: :class:`train.engine.Trainer`, as ``fit`` uses them
  (SGD with Nesterov momentum, OneCycle per batch, label smoothing);
- augmentation: :class:`train.transforms.AugmentationPreset`, on the CPU;
- device and precision: :func:`train.device.resolve_device` (the resolver of ``train.device``)
  and ``--precision`` (autocast on CUDA, as ``train.precision``); on a GPU the images are kept in
  its memory (:func:`train.engine.place_data`);
- each epoch: :func:`train.engine.train_one_epoch` on ``--device``, then the validation accuracy
  from :func:`train.engine.evaluate`; after the last epoch the test accuracy (the 10,000 test
  images). No early stopping and no EMA (it did not help): the last epoch's weights are tested.

``--parallel N`` trains N recipes at once, in spawned worker processes with ``--threads`` torch
threads each (1 by default then). One JSON line per recipe is printed on stdout as it finishes
(the recipe's fields, ``val_curve_pct``, ``val_accuracy_pct``, ``test_accuracy_pct``, ``seconds``,
``device``, ``images_trained``, ...); progress goes to stderr. ``--output FILE.md`` writes the
results as a Markdown table (rewritten as each recipe finishes).

``--cpu-throughput`` first times a few training steps of each recipe's model on this machine's
CPU (2 torch threads, channels_last, the recipe's batch size and augmentation, random images;
:func:`measure_cpu_throughput`) and prices the recipe in CPU hours, epochs × training images /
images per second / 3600 (:func:`projected_cpu_hours`): how a recipe found on a GPU is priced for
the 2-core, 60-minute training budget. Run it on the machine the budget is for;
``--price-only`` does just that, without training.

A full recipe takes minutes on a GPU and hours on 2 CPU cores. ``--limit-per-class 20`` with a
width-4 recipe makes a seconds-long run (the tests). A bad recipe file, an unknown recipe name or
model, an unavailable device or a precision the device cannot train in (bf16/fp16 on the CPU) is
reported in one line, with exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from common.preprocess import PreprocessSpec
from common.settings import SettingsError, one_line, read_yaml_mapping
from train import device as train_device
from train.config import DataConfig, ModelConfig, Precision, TrainConfig, load_settings
from train.data import FASHION_MNIST_CLASSES, DataBundle, Split, load_data, to_tensors
from train.engine import Trainer, place_data, set_seed
from train.models import ARCHITECTURES, build_model
from train.transforms import AugmentationPreset

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = PROJECT_ROOT / "configs" / "recipes.yaml"
#: Exit code for a usage problem (bad recipe file, unknown name, model or device).
EXIT_USAGE = 2
#: Torch threads of the CPU-throughput measurement: the training machine's two cores.
CPU_THREADS = 2
EVAL_BATCH_SIZE = 1000


class RecipeError(ValueError):
    """A recipe file, recipe name or model problem, in one line (a device or precision problem
    is a :class:`train.device.DeviceError`)."""


class Recipe(BaseModel):
    """One training recipe: architecture, schedule, regularisation and augmentation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field("resnet_small", description="An architecture of train.models.")
    width: int = Field(32, ge=4, le=256, description="Base channel count.")
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0.0, description="Peak learning rate of the OneCycle schedule.")
    weight_decay: float = Field(5e-4, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    crop_padding: int = Field(0, ge=0, le=14, description="Padded random crop; 0 = none.")
    erase_probability: float = Field(0.0, ge=0.0, le=1.0, description="Random erasing.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = 0

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown model '{value}' (known: {', '.join(sorted(ARCHITECTURES))})")
        return value

    def model_settings(self) -> ModelConfig:
        """The :class:`ModelConfig` to build: this architecture and width, flip TTA on."""
        return ModelConfig(name=self.model, width=self.width, flip_tta=True)

    def train_settings(
        self, channels_last: bool = False, precision: Precision = "fp32"
    ) -> TrainConfig:
        """The :class:`TrainConfig`: SGD + OneCycle with this recipe's numbers, no progress bar."""
        return TrainConfig(
            precision=precision,
            epochs=self.epochs,
            batch_size=self.batch_size,
            eval_batch_size=EVAL_BATCH_SIZE,
            lr=self.lr,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            seed=self.seed,
            channels_last=channels_last,
            progress=False,
        )

    def augmentation(self) -> AugmentationPreset:
        """Horizontal flips, plus this recipe's crop padding and erasing probability."""
        return AugmentationPreset(
            crop_padding=self.crop_padding, hflip=True, erase_probability=self.erase_probability
        )


@dataclass(frozen=True)
class RunOptions:
    """How every recipe of one invocation runs."""

    device: str = "cpu"
    threads: int | None = None
    limit_per_class: int | None = None
    data_path: Path | None = None
    channels_last: bool = False
    precision: Precision = "fp32"


@dataclass(frozen=True)
class RecipeResult:
    """What one recipe reached (accuracies in percent), and what it cost."""

    recipe: Recipe
    train_images: int
    device: str | None = None
    device_name: str | None = None
    val_curve_pct: tuple[float, ...] = ()
    test_accuracy_pct: float | None = None
    seconds: float | None = None
    images_trained: int = 0
    cpu_images_per_s: float | None = None

    @property
    def val_accuracy_pct(self) -> float | None:
        """Validation accuracy after the last epoch."""
        return self.val_curve_pct[-1] if self.val_curve_pct else None

    @property
    def cpu_hours(self) -> float | None:
        """Projected hours on this machine's CPU (needs ``cpu_images_per_s``)."""
        if self.cpu_images_per_s is None:
            return None
        return projected_cpu_hours(self.recipe.epochs, self.train_images, self.cpu_images_per_s)

    def as_json(self) -> dict[str, Any]:
        """The JSON line: the recipe's fields, then the results."""
        hours = self.cpu_hours
        return {
            **self.recipe.model_dump(),
            "device": self.device,
            "device_name": self.device_name,
            "val_curve_pct": list(self.val_curve_pct),
            "val_accuracy_pct": self.val_accuracy_pct,
            "test_accuracy_pct": self.test_accuracy_pct,
            "seconds": self.seconds,
            "images_trained": self.images_trained,
            "train_images": self.train_images,
            "cpu_images_per_s": (
                round(self.cpu_images_per_s, 1) if self.cpu_images_per_s is not None else None
            ),
            "cpu_hours": round(hours, 3) if hours is not None else None,
        }


@dataclass(frozen=True)
class RecipeFailure:
    """A recipe that raised while training (the others go on)."""

    name: str
    error: str

    def as_json(self) -> dict[str, Any]:
        """The JSON line of a failure."""
        return {"name": self.name, "error": self.error}


# --------------------------------------------------------------------------- recipes


def load_recipes(path: Path) -> list[Recipe]:
    """Read and validate a recipe file: a mapping whose ``recipes`` key lists the recipes.

    Raises:
        RecipeError: a missing or malformed file, an unknown field or model, a bad value or a
            duplicate name, in one line naming the file and the recipe.
    """
    try:
        tree = read_yaml_mapping(path)
    except SettingsError as exc:
        raise RecipeError(str(exc).replace("config file", "recipe file", 1)) from exc
    unknown = sorted(set(tree) - {"recipes"})
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; want 'recipes'")
    entries = tree.get("recipes")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{path}: 'recipes' must be a non-empty list of recipes")
    recipes: list[Recipe] = []
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise RecipeError(
                f"{path}: recipe #{index} must be a mapping, got {type(entry).__name__}"
            )
        name = entry.get("name")
        label = f"recipe '{name}'" if isinstance(name, str) else f"recipe #{index}"
        try:
            recipes.append(Recipe.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "recipe"
            message = " ".join(str(first["msg"]).split())
            raise RecipeError(
                f"{path}: {label}: {where}: {message} (got {first.get('input')!r})"
            ) from exc
    names = [r.name for r in recipes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{path}: duplicate recipe name(s) {', '.join(duplicates)}")
    return recipes


def select(recipes: Sequence[Recipe], names: Sequence[str]) -> list[Recipe]:
    """The recipes called ``names``, in that order (all of them when ``names`` is empty).

    Raises:
        RecipeError: a name that is not in ``recipes``.
    """
    if not names:
        return list(recipes)
    by_name = {r.name: r for r in recipes}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise RecipeError(f"unknown recipe(s) {', '.join(unknown)} (known: {', '.join(by_name)})")
    return [by_name[n] for n in dict.fromkeys(names)]


def resolve_device(name: str) -> torch.device:
    """``--device``, by the resolver ``python -m train`` uses for ``train.device``.

    ``auto`` = CUDA when available, else the CPU; ``cuda`` without CUDA is a
    :class:`train.device.DeviceError` (a one-line settings error, exit code 2 here).
    """
    return train_device.resolve_device(name, "--device")


# --------------------------------------------------------------------------- training


@functools.cache
def load_bundle(
    val_fraction: float, limit_per_class: int | None, data_path: Path | None
) -> DataBundle[Split]:
    """Fashion-MNIST split the project's way (``configs/data.yaml``), with these overrides."""
    data = load_settings().data.model_dump()
    data.update(source="fashion_mnist", val_fraction=val_fraction, limit_per_class=limit_per_class)
    if data_path is not None:
        data["path"] = data_path
    return load_data(DataConfig.model_validate(data))


def _device_name(device: torch.device) -> str:
    return train_device.device_description(device)


def run_recipe(recipe: Recipe, options: RunOptions) -> RecipeResult:
    """Train ``recipe`` from scratch on ``options.device``; validation after each epoch, then test.

    Progress (one line per epoch) goes to stderr.
    """
    device = torch.device(options.device)
    bundle = load_bundle(recipe.val_fraction, options.limit_per_class, options.data_path)
    # On a GPU the images stay in its memory when they fit (Fashion-MNIST: 47 MB).
    train_data = place_data(to_tensors(bundle.train), device)
    val_data = place_data(to_tensors(bundle.val), device)
    test_data = place_data(to_tensors(bundle.test), device)
    started = time.perf_counter()
    generator = set_seed(recipe.seed)
    cfg = recipe.train_settings(options.channels_last, options.precision)
    model: nn.Module = build_model(recipe.model_settings(), bundle.spec, len(bundle.classes))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = (len(bundle.train) + cfg.batch_size - 1) // cfg.batch_size
    trainer = Trainer(model, cfg, recipe.augmentation(), generator, steps_per_epoch, device)
    curve: list[float] = []
    trained = 0
    for epoch in range(1, cfg.epochs + 1):
        _, _, seen = trainer.epoch(train_data, description=f"{recipe.name} {epoch}/{cfg.epochs}")
        trained += seen
        val = trainer.evaluate(val_data)
        curve.append(round(100 * val.accuracy, 2))
        print(
            f"{recipe.name}: epoch {epoch}/{cfg.epochs} val {curve[-1]:.2f}% "
            f"({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    test = trainer.evaluate(test_data)
    return RecipeResult(
        recipe=recipe,
        train_images=len(bundle.train),
        device=str(device),
        device_name=_device_name(device),
        val_curve_pct=tuple(curve),
        test_accuracy_pct=round(100 * test.accuracy, 2),
        seconds=round(time.perf_counter() - started, 1),
        images_trained=trained,
    )


def _attempt(job: tuple[Recipe, RunOptions]) -> RecipeResult | RecipeFailure:
    """Run one recipe; an exception becomes a :class:`RecipeFailure` so the others go on."""
    recipe, options = job
    try:
        return run_recipe(recipe, options)
    except Exception as exc:
        return RecipeFailure(recipe.name, f"{type(exc).__name__}: {one_line(exc)}")


def _price_only(recipe: Recipe, options: RunOptions) -> RecipeResult | RecipeFailure:
    """No training: the size of the recipe's training split, for its price."""
    try:
        bundle = load_bundle(recipe.val_fraction, options.limit_per_class, options.data_path)
    except Exception as exc:
        return RecipeFailure(recipe.name, f"{type(exc).__name__}: {one_line(exc)}")
    return RecipeResult(recipe, train_images=len(bundle.train))


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def run_all(
    recipes: Sequence[Recipe], options: RunOptions, parallel: int = 1
) -> Iterator[RecipeResult | RecipeFailure]:
    """Run the recipes, ``parallel`` at a time in spawned processes; yield each as it finishes.

    With ``parallel`` 1 they run one after the other in this process.
    """
    jobs = [(recipe, options) for recipe in recipes]
    if parallel <= 1 or len(jobs) <= 1:
        _init_worker(options.threads)
        for job in jobs:
            yield _attempt(job)
        return
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    pool = ProcessPoolExecutor(
        max_workers=min(parallel, len(jobs)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(options.threads,),
    )
    try:
        futures = {pool.submit(_attempt, job): job[0].name for job in jobs}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # a worker died (killed, out of memory): the pool is broken
                yield RecipeFailure(futures[future], f"{type(exc).__name__}: {one_line(exc)}")
    finally:
        # On an interrupt, recipes not started yet are dropped rather than waited for.
        pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- CPU price


def projected_cpu_hours(epochs: int, train_images: int, images_per_s: float) -> float:
    """Hours to train ``epochs`` passes over ``train_images`` at ``images_per_s``."""
    if images_per_s <= 0:
        return float("inf")
    return epochs * train_images / images_per_s / 3600.0


def throughput_key(recipe: Recipe) -> tuple[str, int, int, int, float]:
    """What the CPU speed of a recipe depends on: model, width, batch size and augmentation."""
    return (
        recipe.model,
        recipe.width,
        recipe.batch_size,
        recipe.crop_padding,
        recipe.erase_probability,
    )


def measure_cpu_throughput(
    recipe: Recipe,
    steps: int = 20,
    warmup: int = 3,
    threads: int = CPU_THREADS,
    channels_last: bool = True,
) -> float:
    """Training images/s of ``recipe``'s model on this machine's CPU.

    Times ``steps`` batches of :func:`train.engine.train_one_epoch` (the recipe's batch size,
    augmentation, loss and optimiser) on random images with ``threads`` torch threads, after
    ``warmup`` untimed batches. The thread count is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = set_seed(recipe.seed)
        cfg = recipe.train_settings(channels_last)
        model: nn.Module = build_model(
            recipe.model_settings(), PreprocessSpec(), len(FASHION_MNIST_CLASSES)
        )
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        trainer = Trainer(model, cfg, recipe.augmentation(), generator, warmup + steps)

        def train(batches: int) -> tuple[int, float]:
            n = batches * cfg.batch_size
            images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
            labels = torch.randint(0, len(FASHION_MNIST_CLASSES), (n,), generator=generator)
            started = time.perf_counter()
            _, _, seen = trainer.epoch((images, labels))
            return seen, time.perf_counter() - started

        if warmup > 0:
            train(warmup)
        seen, elapsed = train(max(steps, 1))
        return seen / elapsed if elapsed > 0 else float("inf")
    finally:
        torch.set_num_threads(previous)


def price(
    recipes: Sequence[Recipe], steps: int, channels_last: bool = True
) -> dict[tuple[str, int, int, int, float], float]:
    """CPU images/s for each distinct :func:`throughput_key` of ``recipes`` (logged to stderr)."""
    speeds: dict[tuple[str, int, int, int, float], float] = {}
    for recipe in recipes:
        key = throughput_key(recipe)
        if key not in speeds:
            speeds[key] = measure_cpu_throughput(recipe, steps, channels_last=channels_last)
            print(
                f"cpu throughput {recipe.model} w{recipe.width} batch {recipe.batch_size}: "
                f"{speeds[key]:.0f} images/s ({CPU_THREADS} threads)",
                file=sys.stderr,
                flush=True,
            )
    return speeds


# --------------------------------------------------------------------------- report


def _number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render_markdown(
    results: Sequence[RecipeResult], failures: Sequence[RecipeFailure], context: dict[str, str]
) -> str:
    """The Markdown page: how it ran, one table row per recipe, failures after the table."""
    lines = [
        "# Recipe search",
        "",
        f"`{context.get('command', 'python -m bench.recipe_search')}` on "
        f"{context.get('device', '?')} (torch {torch.__version__}), {context.get('date', '?')}.",
        "",
        "One seed per recipe. Val = the project's stratified validation split (`data.split_seed`), "
        "test = the Fashion-MNIST test images, both with flip TTA, after the last epoch (no early "
        "stopping, no EMA). CPU h = epochs × training images / this machine's CPU training "
        f"images/s ({CPU_THREADS} torch threads, {context.get('cpu_layout', 'channels_last')}, "
        "the recipe's batch size) / 3600.",
        "",
        "| recipe | model | width | epochs | batch | lr | wd | label smoothing | crop pad | erase "
        "| val % | test % | seconds | device | CPU img/s | CPU h |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for result in results:
        r = result.recipe
        lines.append(
            f"| {r.name} | {r.model} | {r.width} | {r.epochs} | {r.batch_size} | {r.lr:g} "
            f"| {r.weight_decay:g} | {r.label_smoothing:g} | {r.crop_padding} "
            f"| {r.erase_probability:g} | {_number(result.val_accuracy_pct)} "
            f"| {_number(result.test_accuracy_pct)} | {_number(result.seconds, 0)} "
            f"| {result.device_name or ''} | {_number(result.cpu_images_per_s, 0)} "
            f"| {_number(result.cpu_hours)} |"
        )
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {f.name}: {f.error}" for f in failures]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.recipe_search", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--recipes", type=Path, default=DEFAULT_RECIPES, help="recipe YAML file")
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    parser.add_argument("--device", choices=train_device.DEVICE_NAMES, default="auto")
    parser.add_argument(
        "--precision",
        choices=train_device.PRECISIONS,
        default="fp32",
        help="bf16/fp16: autocast on CUDA (fp16 with a gradient scaler); the CPU takes fp32 only",
    )
    parser.add_argument("--parallel", type=_positive, default=1, help="recipes at once")
    parser.add_argument(
        "--threads", type=_positive, default=None, help="torch threads per recipe (1 if parallel)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last training (default: on for the CPU, off for CUDA); "
        "--no-channels-last also turns it off for --cpu-throughput",
    )
    parser.add_argument("--limit-per-class", type=_positive, default=None, help="quick runs")
    parser.add_argument(
        "--data", type=Path, default=None, help="Fashion-MNIST idx folder (default: data.path)"
    )
    parser.add_argument(
        "--cpu-throughput", action="store_true", help="price each recipe in CPU hours"
    )
    parser.add_argument("--price-only", action="store_true", help="--cpu-throughput, no training")
    parser.add_argument("--throughput-steps", type=_positive, default=20, help="timed batches")
    parser.add_argument("--output", type=Path, default=None, help="Markdown table file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the selected recipes, print JSON lines, optionally write Markdown."""
    args = parse_args(argv)
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        recipes = select(
            load_recipes(args.recipes), [n.strip() for n in args.only.split(",") if n.strip()]
        )
        if args.list:
            for recipe in recipes:
                print(json.dumps(recipe.model_dump()))
            return 0
        device = resolve_device(args.device)
        precision = train_device.check_precision(args.precision, device, "--precision")
        load_settings()  # a broken configs/data.yaml is a usage error, before any work
    except (RecipeError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    threads = args.threads if args.threads is not None else (1 if args.parallel > 1 else None)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cpu"
    options = RunOptions(
        str(device), threads, args.limit_per_class, args.data, channels_last, precision
    )
    speeds: dict[tuple[str, int, int, int, float], float] = {}
    if args.cpu_throughput or args.price_only:
        speeds = price(recipes, args.throughput_steps, args.channels_last is not False)
    context = {
        "command": " ".join(["python -m bench.recipe_search", *words]),
        "device": "a CPU (price only)" if args.price_only else _device_name(device),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_layout": "NCHW" if args.channels_last is False else "channels_last",
    }
    done: dict[str, RecipeResult] = {}
    failures: list[RecipeFailure] = []
    if args.price_only:
        outcomes: Iterator[RecipeResult | RecipeFailure] = (
            _price_only(recipe, options) for recipe in recipes
        )
    else:
        outcomes = run_all(recipes, options, args.parallel)
    for outcome in outcomes:
        if isinstance(outcome, RecipeFailure):
            failures.append(outcome)
        else:
            outcome = replace(outcome, cpu_images_per_s=speeds.get(throughput_key(outcome.recipe)))
            done[outcome.recipe.name] = outcome
        print(json.dumps(outcome.as_json()), flush=True)
        if args.output is not None:
            ordered = [done[r.name] for r in recipes if r.name in done]
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(render_markdown(ordered, failures, context))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
