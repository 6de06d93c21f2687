"""What an imported model holds: the file and tensor names ``train.export`` writes and serving reads."""

from __future__ import annotations

#: The ONNX graph inside the BentoML model folder.
ONNX_FILE = "model.onnx"
#: The graph's input (``float32 [N, C, H, W]``) and output (logits ``[N, classes]``).
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: The validation-split reference distribution for drift, beside the graph.
REFERENCE_FILE = "reference.json"
