"""Multi-process training: shards, launch context, and two real ``torchrun`` processes on tiny data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from common.preprocess import PreprocessSpec
from tests.conftest import cli_overrides
from train import tracking
from train.config import ModelConfig, Settings, TrainConfig
from train.data import iterate_batches
from train.device import Placement
from train.distributed import SINGLE, DistributedContext, current, launch_context, process_group
from train.engine import (
    CheckpointError,
    Trainer,
    check_resumable,
    evaluate,
    load_checkpoint,
    validate,
)
from train.models import build_model
from train.pipeline import run_fit
from train.transforms import PRESETS

MakeSettings = Callable[..., Settings]
REPO = Path(__file__).resolve().parent.parent
PROCESSES = 2


@pytest.mark.parametrize(("n", "world_size"), [(12, 2), (11, 2), (10, 3), (2, 3), (7, 1)])
def test_shards_are_disjoint_equal_and_cover_the_order(n: int, world_size: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [DistributedContext(r, world_size).shard(order) for r in range(world_size)]
    sizes = {len(s) for s in shards}
    assert sizes == {-(-n // world_size)}  # same steps on every process
    seen = torch.cat(shards).tolist()
    assert set(seen) == set(range(n))  # covering
    assert len(seen) - len(set(seen)) == len(seen) - n < world_size  # only the padding repeats
    if n % world_size == 0:
        assert len(seen) == n  # disjoint


@pytest.mark.parametrize(("n", "world_size"), [(10, 2), (11, 3), (1, 2)])
def test_validation_splits_are_disjoint_and_cover(n: int, world_size: int) -> None:
    parts = [DistributedContext(r, world_size).split(n).tolist() for r in range(world_size)]
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))


def test_batches_of_all_ranks_cover_the_epoch_drawn_alike() -> None:
    labels = torch.arange(21)
    images = labels.view(-1, 1, 1, 1).to(torch.uint8)
    seen: list[int] = []
    for rank in range(PROCESSES):
        generator = torch.Generator().manual_seed(7)  # every rank seeds the order alike
        context = DistributedContext(rank, PROCESSES)
        for _, batch in iterate_batches(images, labels, 4, generator, context):
            seen.extend(batch.tolist())
    assert set(seen) == set(range(21)) and len(seen) == 22  # one padded repeat


def test_one_process_iterates_as_before() -> None:
    labels = torch.arange(9)
    batches = iterate_batches(labels.view(-1, 1, 1, 1), labels, 4, torch.Generator().manual_seed(3))
    expected = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    assert torch.cat([b for _, b in batches]).tolist() == expected.tolist()


def test_each_rank_augments_differently_and_reproducibly() -> None:
    def draws(rank: int, epoch: int) -> list[float]:
        generator = DistributedContext(rank, PROCESSES).seed_epoch(0, epoch)
        return torch.rand(4, generator=generator).tolist() + torch.rand(2).tolist()

    assert draws(0, 1) == draws(0, 1)
    assert draws(0, 1) != draws(1, 1)
    assert draws(0, 1) != draws(0, 2)


def test_launch_context_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_context() == SINGLE and launch_context().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launched = launch_context()
    assert (launched.rank, launched.world_size, launched.local_rank) == (3, 4, 1)
    assert not launched.is_main and launched.is_distributed
    assert current() == SINGLE  # no process group is up


def test_single_process_helpers_do_no_collectives() -> None:
    assert SINGLE.sum([1.5, 2], torch.device("cpu")) == [1.5, 2.0]
    assert SINGLE.from_main("decision") == "decision"


def test_resume_needs_the_same_number_of_processes() -> None:
    check_resumable({}, SINGLE)  # older checkpoints: one process
    check_resumable({"world_size": 2}, DistributedContext(1, 2))
    with pytest.raises(
        CheckpointError,
        match=r"world size 2 .* world size 1; resume it under torchrun with 2 processes",
    ):
        check_resumable({"world_size": 2}, SINGLE)
    with pytest.raises(CheckpointError, match="resume it without torchrun"):
        check_resumable({"world_size": 1}, DistributedContext(0, 2))


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistributedContext]:
    """The process group of a one-process ``torchrun`` launch, in this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**launch, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    with process_group(Placement(torch.device("cpu"))) as (context, placement):
        assert placement.device == torch.device("cpu")
        yield context
    assert not dist.is_initialized()


def test_torchrun_variables_start_a_gloo_group_on_the_cpu(
    one_process_group: DistributedContext,
) -> None:
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert one_process_group == current() == DistributedContext(0, 1, 0)


def test_validation_adds_up_the_processes_shares(one_process_group: DistributedContext) -> None:
    """Rank 0 of two (alone in the group): it evaluates every other image, and the sum over the
    group is its own."""
    del one_process_group
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 2, (9,), generator=generator)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="simple_cnn", width=4), PreprocessSpec(), 2)
    cfg = TrainConfig(progress=False, eval_batch_size=4)
    rank0 = DistributedContext(0, 2)
    trainer = Trainer(model, cfg, PRESETS["none"], generator, 1, context=rank0)
    loss, accuracy = validate(trainer, model, (images, labels))
    mine = evaluate(model, (images[0::2], labels[0::2]), 4)
    assert (loss, accuracy) == pytest.approx((mine.loss, mine.accuracy))
    assert rank0.sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert rank0.from_main({"stop": True}) == {"stop": True}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_SERVE__")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={PROCESSES}",
        "-m",
        "train",
        "fit",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_trains_one_run_with_one_checkpoint_and_resumes(
    make_settings: MakeSettings,
) -> None:
    """Two gloo processes: one MLflow run, one checkpoint folder, and ``--resume`` continues it."""
    settings = make_settings()
    overrides = [*cli_overrides(settings), "train.epochs=2", "train.batch_size=16"]
    result = _torchrun(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("val_accuracy=") == 1  # the main process prints the result once

    tracking.connect(settings.tracking)
    runs = mlflow.search_runs(output_format="list", search_all_experiments=True)
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run_id in result.stdout
    assert run.data.params["world_size"] == str(PROCESSES)
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2]
    assert "test_accuracy" in run.data.metrics
    assert run.data.metrics["epochs_trained"] == 2
    folders = list(Path(settings.train.checkpoint_dir).iterdir())
    assert [f.name for f in folders] == [run_id]
    checkpoint = load_checkpoint(folders[0] / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["world_size"] == PROCESSES
    # The unwrapped model's weights: they load into a single-process model as they are.
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    spec = PreprocessSpec.model_validate(checkpoint["spec"])
    build_model(settings.model, spec, len(checkpoint["classes"])).load_state_dict(
        checkpoint["model"]
    )

    # Resume the epoch-1 checkpoint (the one kept beside last.pt) under torchrun again.
    resumed = _torchrun([*overrides, "--resume", str(folders[0] / "previous.pt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_id in resumed.stdout
    runs = mlflow.search_runs(output_format="list", search_all_experiments=True)
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.data.tags["resumed_after_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 2]
    assert load_checkpoint(folders[0] / "last.pt")["epoch"] == 2
    assert [f.name for f in Path(settings.train.checkpoint_dir).iterdir()] == [run_id]

    # A single process cannot continue what two processes started.
    with pytest.raises(CheckpointError, match="under torchrun with 2 processes"):
        run_fit(settings, resume=folders[0])
