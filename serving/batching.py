"""Adaptive batching on the worker's event loop: what arrives while the model is busy runs next, together.

A request never waits for a batch to fill: when the model is idle its batch starts on the next
turn of the event loop, holding every request parsed in the same turn. Requests that arrive
while a batch runs queue up and form the next one, up to ``max_batch_size`` images (the
endpoint's cap, fitted to the model's measured cost per batch size by
:meth:`serving.settings.BatchingSettings.batch_size_for`). So under light load every batch is
one request, as with batching off, and under load the batches grow by themselves.

Small batches run on the event loop (a thread hop costs more than a small model call); batches
above ``inline_max`` images run in a worker thread, where ONNX Runtime releases the GIL and the
loop goes on parsing the next requests. A request that would wait longer than
``max_latency_ms`` (queued images times the measured cost per image) is refused with 503.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from serving.schema import BadInputError, Prediction

Run = Callable[[NDArray[np.float32]], list[Prediction]]
#: How much each batch moves the running estimate of the model's cost per image.
COST_SMOOTHING = 0.2


@dataclass
class _Waiting:
    pixels: NDArray[np.float32]
    done: asyncio.Future[list[Prediction]]


class Batcher:
    """One endpoint's queue in front of the model (one batch in flight at a time)."""

    def __init__(
        self,
        run: Run,
        max_batch_size: int,
        max_latency_ms: float,
        inline_max: int,
        ms_per_image: float,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        """``run`` predicts a batch; ``ms_per_image`` seeds the wait estimate (503 beyond
        ``max_latency_ms``) until real batches have been timed."""
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.inline_max = inline_max
        self.seconds_per_image = ms_per_image / 1000
        self._limiter = limiter
        self._queue: deque[_Waiting] = deque()
        self._queued_images = 0
        self._drainer: asyncio.Task[None] | None = None

    async def __call__(self, pixels: NDArray[np.float32]) -> list[Prediction]:
        """The predictions for ``pixels`` (one request's images), in order.

        Raises:
            BadInputError: 503 ``overloaded`` when the queue ahead would take longer than
                ``max_latency_ms``.
        """
        if self.max_batch_size <= 1:  # batching off: one model call per request
            return await self._predict(pixels)
        expected = (self._queued_images + len(pixels)) * self.seconds_per_image
        if expected > self.max_latency_s:
            raise BadInputError(
                503,
                "overloaded",
                f"the service is overloaded: about {expected * 1000:.0f} ms of queued work "
                f"(max_latency_ms {self.max_latency_s * 1000:.0f})",
            )
        loop = asyncio.get_running_loop()
        waiting = _Waiting(pixels, loop.create_future())
        self._queue.append(waiting)
        self._queued_images += len(pixels)
        if self._drainer is None:
            # Its first step comes after the callbacks already due in this turn of the loop,
            # so the requests parsed in this turn join the batch.
            self._drainer = loop.create_task(self._drain())
        return await waiting.done

    def _take(self) -> list[_Waiting]:
        taken = [self._queue.popleft()]
        images = len(taken[0].pixels)
        while self._queue and images + len(self._queue[0].pixels) <= self.max_batch_size:
            images += len(self._queue[0].pixels)
            taken.append(self._queue.popleft())
        self._queued_images -= images
        return taken

    async def _drain(self) -> None:
        try:
            while self._queue:
                taken = self._take()
                try:
                    predictions = await self._predict_chunked([w.pixels for w in taken])
                except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                    for waiting in taken:
                        if not waiting.done.done():
                            waiting.done.set_exception(exc)
                else:
                    start = 0
                    for waiting in taken:
                        count = len(waiting.pixels)
                        if not waiting.done.done():
                            waiting.done.set_result(predictions[start : start + count])
                        start += count
                # Let the requests that arrived meanwhile be parsed before the next batch.
                await asyncio.sleep(0)
        finally:
            self._drainer = None

    async def _predict_chunked(self, parts: Sequence[NDArray[np.float32]]) -> list[Prediction]:
        pixels = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if len(pixels) <= self.max_batch_size:
            return await self._predict(pixels)
        predictions: list[Prediction] = []  # one request bigger than the cap: in chunks
        for start in range(0, len(pixels), self.max_batch_size):
            predictions += await self._predict(pixels[start : start + self.max_batch_size])
        return predictions

    async def _predict(self, pixels: NDArray[np.float32]) -> list[Prediction]:
        started = time.perf_counter()
        if len(pixels) <= self.inline_max:
            predictions = self.run(pixels)
        else:
            predictions = await anyio.to_thread.run_sync(self.run, pixels, limiter=self._limiter)
        per_image = (time.perf_counter() - started) / len(pixels)
        self.seconds_per_image += COST_SMOOTHING * (per_image - self.seconds_per_image)
        return predictions
