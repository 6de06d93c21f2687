"""What an imported model holds: the file and tensor names ``train.export`` writes and serving reads."""

from __future__ import annotations

#: The ONNX graph inside the BentoML model folder.
ONNX_FILE = "model.onnx"
#: The graph's input (``float32 [N, C, H, W]``) and output (logits ``[N, classes]``).
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: The validation-split reference distribution for drift, beside the graph.
REFERENCE_FILE = "reference.json"

#: BentoML labels ``train.export`` puts on every imported model: where it came from in the MLflow
#: registry. ``alias`` is the registry alias it was imported through (absent for an import of an
#: explicit version); serving resolves the model to serve from it (:mod:`serving.lineage`).
LABEL_NAME = "registered_model"
LABEL_VERSION = "registered_version"
LABEL_ALIAS = "alias"
LABEL_RUN = "run_id"
LABEL_COMMIT = "git_commit"
#: Metadata key: ONNX Runtime's measured milliseconds per image by batch size, at import.
BATCH_PROFILE = "batch_profile"
