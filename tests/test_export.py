"""Import into BentoML: ONNX export, parity, lineage, idempotence and refusal on a parity failure."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bentoml
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from numpy.typing import NDArray
from torch import nn

from common.model_format import ONNX_FILE
from common.preprocess import PreprocessSpec, to_model_input
from serving.bentoml_bridge import model_store_at
from serving.lineage import choose_served, profiled_costs
from tests.conftest import MakeSettings
from train import export, tracking
from train.config import ExportConfig, ModelConfig
from train.export import (
    ExportError,
    check_parity,
    export_onnx,
    import_champion,
    import_to_bento,
    onnx_logits,
    parity_input,
)
from train.models import build_model

CLASSES = ["shirt", "shoe", "bag"]
SPEC = PreprocessSpec()
LINEAGE: dict[str, Any] = {
    "registered_name": "fashion-classifier",
    "version": "7",
    "alias": "champion",
    "run_id": "abc123",
    "metrics": {"val_accuracy": 0.91},
    "git_commit": "deadbeef",
}


def tiny_model(seed: int = 0) -> nn.Module:
    """A 3-class ``resnet_small`` of width 4 with random weights."""
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="resnet_small", width=4), SPEC, num_classes=len(CLASSES))


def pixel_images(count: int = 8, seed: int = 0) -> NDArray[np.uint8]:
    """Random ``uint8 [N, 28, 28, 1]`` images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, 28, 28, 1), dtype=np.uint8)


def pixel_batch(count: int = 8, seed: int = 0) -> NDArray[np.float32]:
    return to_model_input(list(pixel_images(count, seed)))


def stored_models(home: Path) -> list[bentoml.Model]:
    with model_store_at(home):
        try:
            return list(bentoml.models.list("fashion-classifier"))
        except bentoml.exceptions.NotFound:
            return []


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    """BentoML's store is ``tmp_path``'s for the test (what ``BENTOML_HOME`` does for a process)."""
    with model_store_at(tmp_path):
        yield tmp_path


def metadata_of(stored: bentoml.Model) -> dict[str, Any]:
    return dict(stored.info.metadata)


def test_export_has_a_dynamic_batch_and_matches_torch(tmp_path: Path) -> None:
    model = tiny_model()
    path = export_onnx(model, SPEC, tmp_path / "m.onnx", opset=17)
    for count in (1, 5):
        batch = pixel_batch(count)
        logits = onnx_logits(path, batch)
        assert logits.shape == (count, len(CLASSES))
    assert check_parity(model, path, pixel_batch(8), atol=1e-4) <= 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_export_failure_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="ONNX export"):
        export_onnx(tiny_model(), SPEC, tmp_path / "m.onnx", opset=1)


def test_parity_names_the_difference(tmp_path: Path) -> None:
    model = tiny_model()
    path = export_onnx(model, SPEC, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ExportError, match=r"differ by up to .*allowed"):
        check_parity(tiny_model(seed=1), path, pixel_batch(), atol=1e-4)


def test_parity_refuses_another_shape_or_nan(tmp_path: Path) -> None:
    model = tiny_model()
    path = export_onnx(model, SPEC, tmp_path / "m.onnx", opset=17)
    other = build_model(ModelConfig(name="resnet_small", width=4), SPEC, num_classes=4)
    with pytest.raises(ExportError, match="shape"):
        check_parity(other, path, pixel_batch(), atol=1e-4)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(ExportError, match="not finite"):
        check_parity(broken, path, pixel_batch(), atol=1e-4)


def test_import_stores_onnx_metadata_and_lineage(store: Path) -> None:
    tag = import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), ExportConfig())
    (stored,) = stored_models(store)
    assert stored.tag == tag
    assert Path(stored.path_of(ONNX_FILE)).is_file()
    assert stored.info.labels == {
        "registered_model": "fashion-classifier",
        "registered_version": "7",
        "alias": "champion",
        "run_id": "abc123",
        "git_commit": "deadbeef",
    }
    metadata = metadata_of(stored)
    assert metadata["class_names"] == CLASSES
    assert PreprocessSpec.model_validate(metadata["preprocess"]) == SPEC
    assert metadata["lineage"]["metrics"] == {"val_accuracy": 0.91}
    assert metadata["lineage"]["alias"] == "champion"
    assert metadata["onnx"]["parity_max_abs_diff"] <= 1e-4
    # The cost per image at each configured batch size, which caps the service's batching.
    profile = metadata["batch_profile"]
    assert profile["threads"] == 1
    assert sorted(int(size) for size in profile["ms_per_image"]) == [1, 2, 4, 8, 16, 32, 64]
    assert all(cost > 0 for cost in profile["ms_per_image"].values())
    assert profiled_costs(stored.info.metadata) == {
        int(size): cost for size, cost in profile["ms_per_image"].items()
    }
    served = onnx_logits(Path(stored.path_of(ONNX_FILE)), pixel_batch())
    assert served.shape == (8, len(CLASSES))


def test_importing_the_alias_current_version_again_keeps_one_model(store: Path) -> None:
    cfg = ExportConfig()
    first = import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), cfg)
    again = import_to_bento(tiny_model(seed=3), CLASSES, SPEC, LINEAGE, pixel_batch(), cfg)
    assert again == first
    assert len(stored_models(store)) == 1
    newer = import_to_bento(
        tiny_model(), CLASSES, SPEC, {**LINEAGE, "version": "8"}, pixel_batch(), cfg
    )
    assert newer != first
    assert len(stored_models(store)) == 2


def test_the_same_version_from_another_run_is_a_new_model(store: Path) -> None:
    """Another MLflow store numbers its versions from 1 again: version 7 of run xyz is not abc's."""
    cfg = ExportConfig()
    first = import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), cfg)
    other = import_to_bento(
        tiny_model(seed=5), CLASSES, SPEC, {**LINEAGE, "run_id": "xyz789"}, pixel_batch(), cfg
    )
    assert other != first and len(stored_models(store)) == 2
    assert choose_served(stored_models(store), "fashion-classifier", "champion") == str(other)
    served = {str(m.tag): m for m in stored_models(store)}[str(other)]
    assert served.info.labels["run_id"] == "xyz789"


def test_rolling_back_saves_a_fresh_copy_that_becomes_the_served_entry(store: Path) -> None:
    """v7, then v8, then v7 again through @champion: a new entry of v7, newest of the alias."""
    cfg = ExportConfig()
    v7 = import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), cfg)
    v8 = import_to_bento(
        tiny_model(seed=1), CLASSES, SPEC, {**LINEAGE, "version": "8"}, pixel_batch(), cfg
    )
    assert choose_served(stored_models(store), "fashion-classifier", "champion") == str(v8)
    # The model argument is ignored: the stored graph of v7 is copied, not exported again.
    back = import_to_bento(tiny_model(seed=9), CLASSES, SPEC, LINEAGE, pixel_batch(), cfg)
    assert back not in (v7, v8)
    entries = {str(m.tag): m for m in stored_models(store)}
    assert set(entries) == {str(v7), str(v8), str(back)}  # nothing stored is lost
    assert choose_served(entries.values(), "fashion-classifier", "champion") == str(back)
    copy, original = entries[str(back)], entries[str(v7)]
    assert copy.info.labels == original.info.labels
    assert metadata_of(copy)["lineage"]["reimported_from"] == str(v7)

    assert (
        Path(copy.path_of(ONNX_FILE)).read_bytes() == Path(original.path_of(ONNX_FILE)).read_bytes()
    )
    # Importing v7 once more is a no-op: it already is the alias's newest entry.
    assert import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), cfg) == back
    assert len(stored_models(store)) == 3


def test_an_explicit_version_import_reuses_any_entry_and_is_not_served(store: Path) -> None:
    cfg = ExportConfig()
    pinned = {**LINEAGE, "alias": None, "version": "3"}
    first = import_to_bento(tiny_model(), CLASSES, SPEC, pinned, pixel_batch(), cfg)
    assert "alias" not in stored_models(store)[0].info.labels
    champion = import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), cfg)
    assert import_to_bento(tiny_model(), CLASSES, SPEC, pinned, pixel_batch(), cfg) == first
    assert choose_served(stored_models(store), "fashion-classifier", "champion") == str(champion)


def test_parity_failure_stores_nothing(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_export: Callable[..., Path] = export.export_onnx

    def export_other_weights(
        model: nn.Module, spec: PreprocessSpec, path: Path, opset: int
    ) -> Path:
        return real_export(tiny_model(seed=5), spec, path, opset)

    monkeypatch.setattr(export, "export_onnx", export_other_weights)
    with pytest.raises(ExportError, match="nothing was imported"):
        import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), ExportConfig())
    assert stored_models(store) == []


def test_import_needs_a_registered_name_and_version(store: Path) -> None:
    with pytest.raises(ExportError, match="lineage lacks version"):
        import_to_bento(
            tiny_model(), CLASSES, SPEC, {"registered_name": "x"}, pixel_batch(), ExportConfig()
        )


def test_export_uses_only_public_bentoml_names() -> None:
    """The store is the one BentoML resolves (BENTOML_HOME); no private BentoML API."""
    source = Path(export.__file__).read_text()
    for private in ("bentoml._internal", "_model_store", "BentoMLContainer", "_bentoml_"):
        assert private not in source, private
    assert "bentoml_home" not in ExportConfig.model_fields


def test_parity_input_prefers_test_images(make_settings: MakeSettings) -> None:
    settings = make_settings("export.parity_batch=12")
    batch = parity_input(settings, SPEC, num_classes=10)
    assert batch.shape == (12, 1, 28, 28)
    assert batch.dtype == np.float32
    # The conftest data set lights one bright block per class; random pixels would not.
    assert (batch > 200).mean() < 0.2


def test_parity_input_falls_back_to_seeded_random(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    missing = make_settings(f'data.path="{tmp_path / "nowhere"}"', "export.parity_batch=4")
    first, second = parity_input(missing, SPEC, 10), parity_input(missing, SPEC, 10)
    assert first.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(first, second)
    wrong_size = parity_input(
        make_settings("export.parity_batch=4"), SPEC.model_copy(update={"image_size": 32}), 10
    )
    assert wrong_size.shape == (4, 1, 32, 32)


def test_git_commit_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    commit = export.git_commit()
    assert commit == "unknown" or len(commit) == 40

    def no_git(*args: Any, **kwargs: Any) -> None:
        raise OSError("git not found")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert export.git_commit() == "unknown"


def test_import_champion_from_the_registry(make_settings: MakeSettings, tmp_path: Path) -> None:
    settings = make_settings("export.parity_batch=8")
    experiment = tracking.connect(settings.tracking)
    model = tiny_model()
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metric("val_accuracy", 0.93)
        uri = tracking.log_model(
            model, CLASSES, SPEC, pixel_images(2), torch.__version__, settings.export
        )
    name = settings.tracking.registered_model_name
    version = mlflow.register_model(uri, name).version
    MlflowClient().set_registered_model_alias(name, settings.registry.champion_alias, version)

    with model_store_at(tmp_path / "bento"):
        tag = import_champion(settings)
    (stored,) = stored_models(tmp_path / "bento")
    assert stored.info.labels["alias"] == "champion"
    assert stored.info.labels["registered_version"] == str(version)
    assert stored.tag == tag
    lineage = metadata_of(stored)["lineage"]
    assert lineage["registered_name"] == name
    assert lineage["version"] == str(version)
    assert lineage["run_id"] == run.info.run_id
    assert lineage["metrics"] == {"val_accuracy": 0.93}
    assert lineage["git_commit"]
    assert metadata_of(stored)["class_names"] == CLASSES

    with model_store_at(tmp_path / "bento"):
        assert import_champion(settings) == tag
        assert import_champion(settings, f"models:/{name}/{version}") == tag
        assert len(stored_models(tmp_path / "bento")) == 1

        with pytest.raises(ExportError, match="not a registered model"):
            import_champion(settings, f"runs:/{run.info.run_id}/model")
        with pytest.raises(ExportError, match="cannot resolve"):
            import_champion(settings, f"models:/{name}@nobody")
        with pytest.raises(ExportError, match="cannot load"):
            import_champion(settings, f"models:/{name}/99")


# --------------------------------------------------------------------------- monitoring reference


def test_reference_is_stored_with_the_model_and_can_be_added_later(
    make_settings: MakeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.drift import Reference
    from common.model_format import REFERENCE_FILE
    from train.__main__ import main
    from train.data import FASHION_MNIST_CLASSES
    from train.monitoring import stored_reference

    home = tmp_path / "bento"
    settings = make_settings("export.reference_sample=10")
    classes = list(FASHION_MNIST_CLASSES)
    data = export.reference_input(settings, SPEC, len(classes))
    assert data is not None and len(data.labels) == 10  # round(10 % of 12) per class
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="simple_cnn", width=4), SPEC, num_classes=10)
    with model_store_at(home):
        tag = import_to_bento(model, classes, SPEC, LINEAGE, pixel_batch(), settings.export, data)
    (stored,) = stored_models(home)
    path = Path(stored.path_of(REFERENCE_FILE))
    reference = Reference.load(path)
    assert reference.images == 10 and reference.class_names == classes
    assert all(len(values) == 10 for values in reference.samples.values())
    assert metadata_of(stored)["monitoring"] == {
        "reference": REFERENCE_FILE,
        "images": 10,
        "accuracy": reference.accuracy,
    }
    # The reference is the ONNX model's own view of the validation images.
    expected = onnx_logits(Path(stored.path_of(ONNX_FILE)), data.pixels).argmax(axis=1)
    counts = np.bincount(expected, minlength=10) / 10
    assert list(reference.class_mix.values()) == pytest.approx(counts.tolist(), abs=1e-5)

    path.unlink()
    with model_store_at(home):
        assert export.attach_reference(settings, str(tag)) == path
        assert Reference.load(path) == reference
        path.unlink()
        # Without --model-tag: the served model (the current import of @champion).
        assert main(["reference", *_data_args(settings)]) == 0
        assert f"wrote {path}" in capsys.readouterr().out
        assert stored_reference(str(tag)) == reference
        assert stored_reference("fashion-classifier:nope") is None


def _data_args(settings: Any) -> list[str]:
    """The CLI overrides that point at the same tiny data set as ``settings``."""
    data = settings.data
    return [
        f'data.path="{data.path}"',
        f'data.debian_path="{data.debian_path}"',
        "data.allow_download=false",
        "train.epochs=1",
        "model.name=simple_cnn",
    ]


def test_no_reference_without_fitting_data(
    make_settings: MakeSettings, tmp_path: Path, store: Path
) -> None:
    settings = make_settings()
    assert export.reference_input(settings, SPEC, num_classes=3) is None  # 10 classes in the data
    assert export.reference_input(settings, SPEC.model_copy(update={"image_size": 32}), 10) is None
    missing = make_settings(f'data.path="{tmp_path / "nowhere"}"')
    assert export.reference_input(missing, SPEC, 10) is None

    with pytest.raises(ExportError, match="no such model"):
        export.attach_reference(settings, "fashion-classifier:nope")
    import_to_bento(tiny_model(), CLASSES, SPEC, LINEAGE, pixel_batch(), settings.export)
    (stored,) = stored_models(store)
    assert not Path(stored.path_of("reference.json")).exists()
    with pytest.raises(ExportError, match="no validation images"):
        export.attach_reference(settings)  # 3 classes, the data has 10


def test_batch_profile_keeps_each_sizes_least_disturbed_round(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sizes take turns, so a busy spell slows every size of one round, and that round loses."""
    per_image_ms = {1: 10.0, 2: 9.5, 4: 11.0}
    clock = {"now": 0.0, "round": -1}
    calls: list[int] = []

    class FakeSession:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def run(self, outputs: Any, feeds: dict[str, NDArray[np.float32]]) -> None:
            size = len(next(iter(feeds.values())))
            if size == 1 and calls[-1:] != [1]:
                clock["round"] += 1  # the sizes run in order: size 1 opens a round
            calls.append(size)
            busy = 3.0 if clock["round"] == 1 else 1.0  # the first timed round: a busy machine
            clock["now"] += per_image_ms[size] * size * busy / 1000

    monkeypatch.setattr("train.export.ort.InferenceSession", FakeSession)
    monkeypatch.setattr("train.export.time.perf_counter", lambda: clock["now"])
    profile = export.batch_profile(tmp_path / "m.onnx", SPEC, [4, 1, 2], seconds=0.3, rounds=3)
    assert profile["rounds"] == 3
    assert profile["ms_per_image"] == {"1": 10.0, "2": 9.5, "4": 11.0}
    # One warm-up call each, then every round visits each size in turn.
    timed = [size for index, size in enumerate(calls[3:]) if calls[3:][index - 1 : index] != [size]]
    assert calls[:3] == [1, 2, 4] and timed == [1, 2, 4] * 3
    # The same busy spell without rounds to compare would set the profile.
    clock.update(now=0.0, round=-1)
    calls.clear()
    once = export.batch_profile(tmp_path / "m.onnx", SPEC, [1, 2, 4], seconds=0.3, rounds=1)
    assert once["ms_per_image"] == {"1": 30.0, "2": 28.5, "4": 33.0}
