"""The floor under any Python ASGI design: the least work a ``/predict`` can do, on bare uvicorn.

``POST /predict`` reads the body, splits the multipart upload and decodes it with the product's
own functions (:mod:`serving.uploads`, :mod:`common.preprocess`), runs the served model (the same
ONNX file and session options as the service) on that one image, and answers the top class as
JSON. Nothing else: no batching, metrics, request log, prediction data, API key, error bodies or
middleware; bad input is simply a 400. ``GET /readyz`` answers 200.

``bench/suite.py`` serves it as setup ``asgi_floor`` with ``python -m bench.peer_serve --app
bench.asgi_floor:app --workers N --reuse-port`` (uvicorn, ``TCP_NODELAY``, a socket per worker),
on the model that ``service.py`` serves (``BENTOML_HOME`` and ``FASHION_SERVE_SERVING__MODEL_TAG``).
Its requests/s against the raw model limit is what the service could reach if everything it adds
cost nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import bentoml
import numpy as np

from common import preprocess
from common.model_format import ONNX_FILE
from serving.lineage import served_tag
from serving.runtime import onnx_logits
from serving.schema import BadInputError
from serving.settings import load_serving_settings
from serving.uploads import parse_multipart, read_body

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

_JSON = [(b"content-type", b"application/json")]


class FloorApp:
    """The bare ASGI app; the model loads at lifespan startup (in each uvicorn worker)."""

    def __init__(self) -> None:
        """Nothing loaded yet: uvicorn's supervisor imports this module too."""
        self.model: Any = None

    def load(self) -> None:
        """The served model's ONNX session, classes and preprocessing, as the service loads them."""
        settings = load_serving_settings()
        stored = bentoml.models.get(served_tag(settings))
        metadata = stored.info.metadata
        self.limits = settings.limits
        self.class_names = [str(name) for name in cast(list[Any], metadata["class_names"])]
        self.spec = preprocess.PreprocessSpec.model_validate(metadata["preprocess"])
        self.model = onnx_logits(Path(stored.path_of(ONNX_FILE)), settings, 1)
        side = self.spec.image_size
        self.model(np.zeros((1, self.spec.channels, side, side), dtype=np.float32))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Lifespan (load), ``GET /readyz`` and ``POST /predict``."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.load()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/readyz":
            await self._answer(send, 200 if self.model is not None else 503, b"{}")
            return
        headers = dict(scope["headers"])
        try:
            body = await read_body(receive, headers, self.limits.max_upload_bytes)
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            (upload,) = parse_multipart(body, content_type, "image")
            image = preprocess.decode_image(upload.data, self.limits.max_pixels)
            pixels = preprocess.to_model_input([preprocess.prepare_image(image, self.spec)])
        except (BadInputError, preprocess.ImageDecodeError, ValueError) as exc:
            await self._answer(send, 400, json.dumps({"error": str(exc)}).encode())
            return
        probabilities = preprocess.softmax(self.model(pixels))[0]
        class_id = int(probabilities.argmax())
        answer = {
            "label": self.class_names[class_id],
            "class_id": class_id,
            "confidence": float(probabilities[class_id]),
        }
        await self._answer(send, 200, json.dumps(answer).encode())

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        length = (b"content-length", str(len(body)).encode())
        await send({"type": "http.response.start", "status": status, "headers": [*_JSON, length]})
        await send({"type": "http.response.body", "body": body})


app = FloorApp()
