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
from collections.abc import Callable
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
        self._scheduled = False  # a batch is due or running; the queue waits for it
        self._threaded: asyncio.Task[None] | None = None  # held: the loop keeps weak references

    async def __call__(self, pixels: NDArray[np.float32], alone: bool = False) -> list[Prediction]:
        """The predictions for ``pixels`` (one request's images), in order.

        ``alone``: no other request can join (the worker serves one client connection), so an
        idle model runs them at once, as with batching off, without a turn of the loop.

        Raises:
            BadInputError: 503 ``overloaded`` when the queue ahead would take longer than
                ``max_latency_ms``.
        """
        if self.max_batch_size <= 1:  # batching off: one model call per request
            if len(pixels) <= self.inline_max:
                return self._timed(pixels)
            return await self._in_thread(pixels)
        expected = (self._queued_images + len(pixels)) * self.seconds_per_image
        if expected > self.max_latency_s:
            raise BadInputError(
                503,
                "overloaded",
                f"the service is overloaded: about {expected * 1000:.0f} ms of queued work "
                f"(max_latency_ms {self.max_latency_s * 1000:.0f})",
            )
        if (
            alone
            and not self._scheduled
            and min(len(pixels), self.max_batch_size) <= self.inline_max
        ):
            return [p for chunk in self._chunks(pixels) for p in self._timed(chunk)]
        loop = asyncio.get_running_loop()
        waiting = _Waiting(pixels, loop.create_future())
        self._queue.append(waiting)
        self._queued_images += len(pixels)
        if not self._scheduled:
            self._scheduled = True
            # After the callbacks already due in this turn of the loop: the requests parsed in
            # this turn join the batch.
            loop.call_soon(self._next_batch)
        return await waiting.done

    def _take(self) -> tuple[list[_Waiting], NDArray[np.float32]]:
        taken = [self._queue.popleft()]
        images = len(taken[0].pixels)
        while self._queue and images + len(self._queue[0].pixels) <= self.max_batch_size:
            images += len(self._queue[0].pixels)
            taken.append(self._queue.popleft())
        self._queued_images -= images
        parts = [waiting.pixels for waiting in taken]
        return taken, parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _chunks(self, pixels: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        # One request bigger than the cap runs in chunks of the cap.
        size = self.max_batch_size
        return [pixels[start : start + size] for start in range(0, len(pixels), size)]

    def _next_batch(self) -> None:
        """Run the next batch: on the loop when it is small, else in a thread (one at a time)."""
        if not self._queue:
            self._scheduled = False
            return
        taken, pixels = self._take()
        chunks = self._chunks(pixels)
        if len(chunks[0]) > self.inline_max:
            self._threaded = asyncio.get_running_loop().create_task(
                self._threaded_batch(taken, chunks)
            )
            return
        try:
            predictions = [p for chunk in chunks for p in self._timed(chunk)]
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            self._settle(taken, exc)
        else:
            self._settle(taken, predictions)
        self._after_batch()

    async def _threaded_batch(
        self, taken: list[_Waiting], chunks: list[NDArray[np.float32]]
    ) -> None:
        try:
            predictions = [p for chunk in chunks for p in await self._in_thread(chunk)]
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            self._settle(taken, exc)
        else:
            self._settle(taken, predictions)
        finally:
            self._threaded = None
            self._after_batch()

    def _after_batch(self) -> None:
        if self._queue:  # what arrived meanwhile: after the loop has parsed what is waiting
            asyncio.get_running_loop().call_soon(self._next_batch)
        else:
            self._scheduled = False

    @staticmethod
    def _settle(taken: list[_Waiting], outcome: list[Prediction] | Exception) -> None:
        start = 0
        for waiting in taken:
            count = len(waiting.pixels)
            if not waiting.done.done():  # a cancelled request is skipped
                if isinstance(outcome, Exception):
                    waiting.done.set_exception(outcome)
                else:
                    waiting.done.set_result(outcome[start : start + count])
            start += count

    def _timed(self, pixels: NDArray[np.float32]) -> list[Prediction]:
        started = time.perf_counter()
        predictions = self.run(pixels)
        self._observe(started, len(pixels))
        return predictions

    async def _in_thread(self, pixels: NDArray[np.float32]) -> list[Prediction]:
        started = time.perf_counter()
        predictions = await anyio.to_thread.run_sync(self.run, pixels, limiter=self._limiter)
        self._observe(started, len(pixels))
        return predictions

    def _observe(self, started: float, images: int) -> None:
        per_image = (time.perf_counter() - started) / images
        self.seconds_per_image += COST_SMOOTHING * (per_image - self.seconds_per_image)
