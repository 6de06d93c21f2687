#!/usr/bin/env bash
# /predict throughput of two revisions of the service, side by side, on the same machine and model.
# Usage: bench/compare_revisions.sh BEFORE_REV [ROUNDS] [SCENARIOS]
# Each round runs `python -m bench.serving` once on BEFORE_REV (a temporary git worktree) and once
# on the working tree, alternating, against one store holding a random model of the default
# architecture (configs/model.yaml): serving speed does not depend on the weights.
# COMPARE_STORE=<BentoML home> COMPARE_TAG=<model tag> serve that model instead (an imported
# champion has the drift reference a random model lacks, so drift work is measured too).
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: bench/compare_revisions.sh BEFORE_REV [ROUNDS] [SCENARIOS]}
rounds=${2:-2}
scenarios=${3:-predict:1,predict:64}
python=${PYTHON:-$PWD/.venv/bin/python}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/before" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach -q "$work/before" "$before"
store=${COMPARE_STORE:-$work/store}
if [ -n "${COMPARE_TAG:-}" ]; then
  tag=$COMPARE_TAG
else
tag=$("$python" - "$work/store" <<'PY'
import sys
from pathlib import Path

from train.config import load_settings
from train.data import FASHION_MNIST_CLASSES
from train.tiny import tiny_model_in

print(tiny_model_in(Path(sys.argv[1]), load_settings().model, list(FASHION_MNIST_CLASSES)))
PY
)
tag=$(echo "$tag" | tail -1)
fi
for round in $(seq "$rounds"); do
  for side in before after; do
    dir=$([ "$side" = before ] && echo "$work/before" || echo "$PWD")
    echo "== round $round: $side ($(git -C "$dir" rev-parse --short HEAD)) =="
    (cd "$dir" && "$python" -m bench.serving --bentoml-home "$store" --model-tag "$tag" \
      --scenarios "$scenarios" --output - 2>/dev/null | grep -E '^\| (/|scenario)')
  done
done
