"""The two ImageFolder loaders (``data.loader``), the engine on streamed batches, the data report."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loguru import logger
from PIL import Image

from tests.conftest import MakeSettings, cli_overrides, image_folder_overrides
from train.__main__ import main
from train.config import DataConfig, load_settings
from train.data import (
    DataError,
    FileSplit,
    Split,
    StreamBatches,
    batch_source,
    choose_loader,
    data_findings,
    dataset_statistics,
    format_findings,
    iterate_batches,
    load_data,
    merge_channel_stats,
    open_data,
    to_tensors,
)
from train.engine import evaluate
from train.models import build_model
from train.pipeline import run_evaluate, run_fit

MakeImageFolder = Callable[..., Path]


def _cfg(path: Path, **kwargs: Any) -> DataConfig:
    base: dict[str, Any] = {
        "source": "image_folder",
        "path": path,
        "image_size": 12,
        "channels": 3,
        "num_workers": 0,
        "allow_download": False,
    }
    return DataConfig.model_validate(base | kwargs)


def _log_lines() -> tuple[list[str], int]:
    lines: list[str] = []
    return lines, logger.add(lambda message: lines.append(str(message)), level="INFO")


def _write_folder(
    root: Path,
    counts: dict[str, int],
    size: tuple[int, int] = (16, 16),
    mode: str = "RGB",
    seed: int = 0,
) -> Path:
    """``root/<class>/img_NNN.png``: ``counts[class]`` distinct noise images of one size and mode."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"img_{i:03d}.png")
    return root


# --------------------------------------------------------------------------- loader choice


def test_auto_streams_above_the_budget_and_says_why(image_folder: Path) -> None:
    lines, sink = _log_lines()
    try:
        streamed = open_data(_cfg(image_folder, loader="auto", memory_budget_mb=0.001))
        in_memory = open_data(_cfg(image_folder, loader="auto", memory_budget_mb=4096))
    finally:
        logger.remove(sink)
    assert isinstance(streamed.train, FileSplit) and isinstance(in_memory.train, Split)
    # 24 images x 12 x 12 x 3 bytes = 0.01 MB
    assert any(
        "auto -> stream: 24 images" in line and "take 0.01 MB, budget 0.001 MB" in line
        for line in lines
    )
    assert any("auto -> memory: 24 images" in line and "budget 4096 MB" in line for line in lines)


def test_explicit_loaders_and_fashion_mnist(tmp_path: Path, fmnist_dir: Path) -> None:
    cfg = _cfg(tmp_path, memory_budget_mb=0.001)
    assert choose_loader(cfg.model_copy(update={"loader": "memory"}), 10**9) == "memory"
    assert choose_loader(cfg.model_copy(update={"loader": "stream"}), 1) == "stream"
    fmnist = DataConfig(path=fmnist_dir, loader="stream", allow_download=False)
    assert isinstance(open_data(fmnist).train, Split)  # idx files always load into memory


def test_loader_setting_is_validated() -> None:
    with pytest.raises(Exception, match="loader"):
        load_settings(overrides=["data.loader=disk"])
    with pytest.raises(Exception, match="memory_budget_mb"):
        load_settings(overrides=["data.memory_budget_mb=0"])


# --------------------------------------------------------------------------- same data either way


@pytest.mark.parametrize(
    ("layout", "extra"),
    [("flat", {}), ("train_test", {}), ("flat", {"limit_per_class": 5, "split_seed": 7})],
)
def test_stream_and_memory_split_the_same_files(
    tmp_path: Path, make_image_folder: MakeImageFolder, layout: str, extra: dict[str, Any]
) -> None:
    root = make_image_folder(tmp_path / "images", layout=layout, per_class=10)
    memory = open_data(_cfg(root, loader="memory", **extra))
    stream = open_data(_cfg(root, loader="stream", **extra))
    assert isinstance(memory.train, Split) and isinstance(stream.train, FileSplit)
    for name in ("train", "val", "test"):
        decoded, listed = getattr(memory, name), getattr(stream, name)
        assert len(decoded) == len(listed) > 0
        assert np.array_equal(decoded.labels, listed.labels)
        assert np.array_equal(decoded.images, listed.read(np.arange(len(listed))))
    assert memory.classes == stream.classes
    assert memory.spec == stream.spec  # the pixel statistics sample covers all training images


@pytest.mark.parametrize("workers", [0, 2])
def test_unshuffled_stream_batches_equal_memory_batches(image_folder: Path, workers: int) -> None:
    memory = load_data(_cfg(image_folder))
    stream = open_data(_cfg(image_folder, loader="stream", num_workers=workers))
    assert isinstance(stream.train, FileSplit)
    expected = list(iterate_batches(*to_tensors(memory.train), 4))
    batches = StreamBatches(stream.train, 4, _cfg(image_folder, num_workers=workers), False)
    got = list(batches)
    assert len(batches) == len(got) == len(expected) and batches.num_images == len(memory.train)
    for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 12, 12)
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_shuffled_stream_order_is_fixed_by_seed_and_epoch(image_folder: Path) -> None:
    bundle = open_data(_cfg(image_folder, loader="stream"))
    assert isinstance(bundle.train, FileSplit)

    def order(seed: int, epoch: int) -> list[bytes]:
        batches = StreamBatches(bundle.train, 5, _cfg(image_folder), True, seed)
        batches.set_epoch(epoch)
        return [image.numpy().tobytes() for images, _ in batches for image in images]

    first = order(0, 1)
    assert first == order(0, 1)  # a resumed run sees the same order
    assert first != order(0, 2) and first != order(1, 1)
    assert sorted(first) == sorted(order(0, 2))  # every image once per epoch


def test_batch_source_keeps_arrays_as_tensors(image_folder: Path) -> None:
    memory = load_data(_cfg(image_folder))
    source = batch_source(memory.val, 4, _cfg(image_folder), False)
    assert isinstance(source, tuple) and torch.equal(source[0], to_tensors(memory.val)[0])


def test_a_corrupt_file_in_a_worker_is_one_data_error_line(image_folder: Path) -> None:
    bundle = open_data(_cfg(image_folder, loader="stream"))
    assert isinstance(bundle.test, FileSplit)
    broken = bundle.test.files[0]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    batches = StreamBatches(bundle.test, 4, _cfg(image_folder, num_workers=2), False)
    with pytest.raises(DataError) as caught:
        list(batches)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot read image {broken}")


def test_evaluate_on_streamed_batches_matches_tensors(image_folder: Path) -> None:
    memory = load_data(_cfg(image_folder))
    stream = open_data(_cfg(image_folder, loader="stream"))
    assert isinstance(stream.test, FileSplit)
    settings = load_settings(overrides=["model.name=simple_cnn", "model.width=4"])
    torch.manual_seed(0)
    model = build_model(settings.model, memory.spec, len(memory.classes))
    on_tensors = evaluate(model, to_tensors(memory.test), batch_size=3)
    streamed = StreamBatches(stream.test, 3, _cfg(image_folder), False)
    on_stream = evaluate(model, streamed, batch_size=3)
    assert on_stream.accuracy == on_tensors.accuracy
    assert on_stream.loss == pytest.approx(on_tensors.loss)
    assert np.array_equal(on_stream.predictions, on_tensors.predictions)


def test_fit_streams_an_image_folder_end_to_end(
    make_settings: MakeSettings, image_folder: Path
) -> None:
    settings = make_settings(
        *image_folder_overrides(image_folder),
        "data.loader=stream",
        "data.num_workers=2",
        "train.batch_size=4",
        "train.epochs=2",
    )
    outcome = run_fit(settings)
    assert outcome.epochs == 2 and 0.0 <= outcome.test_accuracy <= 1.0
    import mlflow

    run = mlflow.get_run(outcome.run_id)
    assert run.data.params["data.loader"] == "stream"
    assert run.data.metrics["images_per_second"] > 0
    assert run_evaluate(settings, outcome.model_uri)["test_accuracy"] == pytest.approx(
        outcome.test_accuracy
    )


# --------------------------------------------------------------------------- data report


def _findings(root: Path, loader: str, **extra: Any) -> dict[str, str]:
    cfg = _cfg(root, loader=loader, **extra)
    found = data_findings(dataset_statistics(open_data(cfg)), cfg)
    return {f["kind"]: f["message"] for f in found}


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_clean_folder_has_no_findings(tmp_path: Path, loader: str) -> None:
    root = _write_folder(tmp_path / "clean", {"a": 12, "b": 12, "c": 10})
    assert _findings(root, loader, min_class_images=5) == {}


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_class_imbalance_and_tiny_classes(tmp_path: Path, loader: str) -> None:
    root = _write_folder(tmp_path / "skewed", {"many": 40, "some": 12, "few": 6})
    found = _findings(root, loader, min_class_images=8, imbalance_ratio_warning=3.0)
    # test takes 20%, then val 10% (at least one each): 29 and 4 training images
    assert found["class_imbalance"].startswith("class imbalance: 'many' has 29 training images")
    assert "7.2x the 4 of 'few'" in found["class_imbalance"]
    assert found["tiny_classes"] == "1 class(es) under 8 training images: few: 4"
    relaxed = _findings(root, loader, min_class_images=4, imbalance_ratio_warning=8.0)
    assert "class_imbalance" not in relaxed and "tiny_classes" not in relaxed


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_mixed_sizes_and_modes(tmp_path: Path, loader: str) -> None:
    root = _write_folder(tmp_path / "mixed", {"a": 10, "b": 10})
    _write_folder(tmp_path / "mixed", {"b": 3}, size=(20, 12), mode="L", seed=1)  # 3 replaced
    found = _findings(root, loader, min_class_images=1)
    assert found["mixed_sizes"] == "2 different image sizes: 16x16: 17, 20x12: 3"
    assert found["mixed_modes"] == "2 colour modes: RGB: 17, L: 3"
    assert set(found) == {"mixed_sizes", "mixed_modes"}


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_duplicates_across_splits(tmp_path: Path, loader: str) -> None:
    root = tmp_path / "split"
    _write_folder(root / "train", {"a": 10, "b": 10})
    _write_folder(root / "test", {"a": 3, "b": 3}, seed=1)
    clean = _findings(root, loader, min_class_images=1)
    assert "duplicates_across_splits" not in clean
    shutil.copy(root / "train" / "a" / "img_000.png", root / "test" / "a" / "copy.png")
    shutil.copy(root / "train" / "b" / "img_004.png", root / "test" / "b" / "copy.png")
    found = _findings(root, loader, min_class_images=1)
    assert found["duplicates_across_splits"].startswith("identical images in more than one split")
    # The copied training images landed in train or val (the validation split is drawn from train/)
    cfg = _cfg(root, loader=loader)
    overlap = dataset_statistics(open_data(cfg))["duplicates"]
    assert overlap["train_test_overlap"] + overlap["val_test_overlap"] == 2
    assert overlap["train_val_overlap"] == 0


def test_format_findings() -> None:
    assert format_findings([]).startswith("no findings")
    text = format_findings([{"kind": "k", "message": "a problem", "suggestion": "a fix"}])
    assert text.splitlines() == ["! a problem", "  -> a fix"]


def test_cli_data_prints_the_findings_and_writes_them(
    make_settings: MakeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_folder(tmp_path / "skewed", {"many": 40, "few": 6})
    settings = make_settings()
    args = [
        *cli_overrides(settings),
        "data.source=image_folder",
        f"data.path={root}",
        "data.image_size=12",
        "data.channels=3",
    ]
    assert main(["data", *args]) == 0
    out = capsys.readouterr().out
    assert "! class imbalance: 'many' has 29 training images" in out
    assert "  -> weight the loss by class" in out
    assert "! 1 class(es) under 20 training images: few: 4" in out  # 'many' is not tiny
    stats = json.loads(Path(settings.data.stats_path).read_text())
    assert [f["kind"] for f in stats["findings"]] == ["class_imbalance", "tiny_classes"]


def test_streamed_training_shards_under_torch_distributed(image_folder: Path) -> None:
    """Under torchrun each rank reads its share; a one-process gloo group stands in for it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bundle = open_data(_cfg(image_folder, loader="stream"))
    assert isinstance(bundle.train, FileSplit)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    try:
        batches = StreamBatches(bundle.train, 4, _cfg(image_folder), True, seed=3)
        unsharded = StreamBatches(bundle.val, 4, _cfg(image_folder), False)
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(batches.sampler, torch.utils.data.DistributedSampler)
    assert unsharded.sampler is None  # evaluation reads every image in order
    assert batches.num_images == len(bundle.train)
    batches.set_epoch(1)
    first = [int(label) for _, labels in batches for label in labels]
    batches.set_epoch(2)
    second = [int(label) for _, labels in batches for label in labels]
    assert sorted(first) == sorted(second) == sorted(bundle.train.labels.tolist())
    assert batches.sampler.epoch == 2


def test_streamed_statistics_name_an_unreadable_file(image_folder: Path) -> None:
    bundle = open_data(_cfg(image_folder, loader="stream"))
    assert isinstance(bundle.val, FileSplit)
    broken = bundle.val.files[0]
    broken.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        dataset_statistics(bundle)


def test_split_read_and_statistics_of_nothing() -> None:
    split = Split(np.arange(24, dtype=np.uint8).reshape(3, 2, 2, 2), np.arange(3))
    assert np.array_equal(split.read(np.array([2, 0])), split.images[[2, 0]])
    assert merge_channel_stats([]) == ([0.0], [0.0])


def test_monitoring_reference_is_the_same_from_either_loader(
    make_settings: MakeSettings, image_folder: Path
) -> None:
    from train.export import reference_input

    folder = [
        "data.source=image_folder",
        f"data.path={image_folder}",
        "data.image_size=12",
        "data.channels=3",
    ]
    memory = make_settings(*folder, "data.loader=memory")
    stream = make_settings(*folder, "data.loader=stream", "data.num_workers=0")
    spec = load_data(memory.data).spec
    from_memory = reference_input(memory, spec, 3)
    from_stream = reference_input(stream, spec, 3)
    assert from_memory is not None and from_stream is not None
    assert np.array_equal(from_memory.pixels, from_stream.pixels)
    assert np.array_equal(from_memory.labels, from_stream.labels)
    assert from_memory.sizes == from_stream.sizes == {"20x16": 9, "24x24": 9, "30x18": 6}
    # A validation image that cannot be read leaves the model without a reference.
    bundle = open_data(stream.data)
    assert isinstance(bundle.val, FileSplit)
    bundle.val.files[0].write_bytes(b"not an image")
    assert reference_input(stream, spec, 3) is None
