"""Profile a stored model's cost per image by batch size, as ``python -m train import`` does, N times.

``python -m bench.batch_profile --bentoml-home <store> --model-tag <tag> --repeat 3`` runs
:func:`train.export.batch_profile` with the settings in ``configs/export.yaml`` on the model's
ONNX file and prints each profile as multiples of batch 1, and the cap the service would pick
from it (``serving.settings.BatchingSettings.batch_size_for``), so the profile's run-to-run
spread, and whether it can change the cap, can be seen.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import bentoml

from common.model_format import ONNX_FILE
from common.preprocess import PreprocessSpec
from serving.bentoml_bridge import model_store_at
from serving.settings import load_serving_settings
from train.config import load_settings
from train.export import batch_profile


def main(argv: Sequence[str] | None = None) -> int:
    """Print ``--repeat`` profiles of the model and the cap each gives ``/predict``."""
    parser = argparse.ArgumentParser(prog="python -m bench.batch_profile", description=__doc__)
    parser.add_argument("--bentoml-home", type=Path, required=True)
    parser.add_argument("--model-tag", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    export = load_settings().export
    serving = load_serving_settings()
    with model_store_at(args.bentoml_home):
        stored = bentoml.models.get(args.model_tag)
        onnx_path = Path(stored.path_of(ONNX_FILE))
        spec = PreprocessSpec.model_validate(stored.info.metadata["preprocess"])
    print(
        f"{args.model_tag}: {export.batch_profile_rounds} rounds, "
        f"{export.batch_profile_seconds} s per size (configs/export.yaml)"
    )
    for _ in range(args.repeat):
        costs = batch_profile(
            onnx_path,
            spec,
            export.batch_profile_sizes,
            export.batch_profile_seconds,
            export.batch_profile_rounds,
        )["ms_per_image"]
        by_size = {int(size): cost for size, cost in costs.items()}
        alone = by_size[min(by_size)]
        relative = ", ".join(f"{size}: {cost / alone:.3f}" for size, cost in by_size.items())
        cap = serving.predict.batch_size_for(by_size, serving.batch_cost_tolerance)
        print(f"batch 1 = {alone:.3f} ms per image; × batch 1: {relative}; /predict cap {cap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
