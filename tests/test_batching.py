"""Adaptive batching on the event loop (serving/batching.py): what arrives while busy runs together."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from serving.batching import Batcher
from serving.schema import BadInputError


class Model:
    """Answers each image with its first pixel; records every batch and its thread."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[float]] = []
        self.threads: list[str] = []
        self.fail = fail

    def __call__(self, pixels: NDArray[np.float32]) -> list[Any]:
        self.batches.append([float(p) for p in pixels[:, 0, 0, 0]])
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("model failed")
        return [float(p) for p in pixels[:, 0, 0, 0]]


def images(*values: float) -> NDArray[np.float32]:
    return np.array(values, dtype=np.float32).reshape(-1, 1, 1, 1)


def batcher(model: Model, **options: Any) -> Batcher:
    settings: dict[str, Any] = {
        "max_batch_size": 8,
        "max_latency_ms": 10_000,
        "inline_max": 128,
        "ms_per_image": 1.0,
    }
    return Batcher(model, **(settings | options))


def test_requests_that_arrive_together_run_as_one_batch_in_order() -> None:
    model = Model()
    queue = batcher(model)

    async def main() -> Any:
        return await asyncio.gather(queue(images(1)), queue(images(2, 3)), queue(images(4)))

    assert asyncio.run(main()) == [[1.0], [2.0, 3.0], [4.0]]
    assert model.batches == [[1.0, 2.0, 3.0, 4.0]]


def test_one_request_at_a_time_is_never_held_back() -> None:
    model = Model()
    queue = batcher(model)

    async def main() -> Any:
        return [await queue(images(value)) for value in (1, 2, 3)]

    assert asyncio.run(main()) == [[1.0], [2.0], [3.0]]
    assert model.batches == [[1.0], [2.0], [3.0]]


def test_a_request_alone_runs_at_once_without_a_turn_of_the_loop() -> None:
    """With one client nothing can join: the model runs inside the call, in chunks of the cap."""
    model = Model()
    queue = batcher(model, max_batch_size=2)

    async def main() -> tuple[Any, list[str]]:
        events: list[str] = []
        asyncio.get_running_loop().call_soon(events.append, "next turn")
        answer = await queue(images(1, 2, 3), alone=True)
        events.append("answered")
        joined = await asyncio.gather(queue(images(4)), queue(images(5)))  # not alone: they wait
        return [answer, *joined], events

    answers, events = asyncio.run(main())
    assert answers == [[1.0, 2.0, 3.0], [4.0], [5.0]]
    assert events[0] == "answered"  # before the loop's next turn
    assert model.batches == [[1.0, 2.0], [3.0], [4.0, 5.0]]


def test_a_request_alone_still_waits_behind_a_batch_in_flight() -> None:
    model = Model()
    queue = batcher(model)

    async def main() -> Any:
        return await asyncio.gather(queue(images(1)), queue(images(2), alone=True))

    assert asyncio.run(main()) == [[1.0], [2.0]]
    assert model.batches == [[1.0, 2.0]]  # it joined the batch already due


def test_batches_stay_within_the_cap_and_big_requests_run_in_chunks() -> None:
    model = Model()
    queue = batcher(model, max_batch_size=3)

    async def main() -> Any:
        return await asyncio.gather(
            queue(images(1, 2)), queue(images(3, 4)), queue(images(5, 6, 7, 8, 9, 10, 11))
        )

    assert asyncio.run(main()) == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]]
    assert model.batches == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0, 7.0], [8.0, 9.0, 10.0], [11.0]]


def test_large_batches_run_in_a_thread() -> None:
    model = Model()
    queue = batcher(model, inline_max=2)

    async def main() -> None:
        await queue(images(1, 2))
        await queue(images(1, 2, 3))

    asyncio.run(main())
    main_thread = threading.main_thread().name
    assert model.threads[0] == main_thread and model.threads[1] != main_thread


def test_batching_off_calls_the_model_once_per_request() -> None:
    model = Model()
    queue = batcher(model, max_batch_size=1)

    async def main() -> Any:
        return await asyncio.gather(queue(images(1)), queue(images(2)))

    assert asyncio.run(main()) == [[1.0], [2.0]]
    assert model.batches == [[1.0], [2.0]]


def test_a_queue_longer_than_max_latency_is_refused_with_503() -> None:
    model = Model()
    queue = batcher(model, max_latency_ms=2, ms_per_image=1.0)

    async def main() -> Any:
        return await asyncio.gather(
            queue(images(1)), queue(images(2)), queue(images(3)), return_exceptions=True
        )

    first, second, third = asyncio.run(main())
    assert (first, second) == ([1.0], [2.0])
    assert isinstance(third, BadInputError)
    assert third.status == 503 and third.kind == "overloaded"
    assert "max_latency_ms 2" in str(third)


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs() -> None:
    model = Model(fail=True)
    queue = batcher(model)

    async def main() -> Any:
        failed = await asyncio.gather(queue(images(1)), queue(images(2)), return_exceptions=True)
        model.fail = False
        return [*failed, await queue(images(3))]

    first, second, third = asyncio.run(main())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert third == [3.0]


def test_the_cost_estimate_follows_the_measured_batches() -> None:
    model = Model()
    queue = batcher(model, ms_per_image=1000.0)
    asyncio.run(queue(images(1)))
    assert queue.seconds_per_image < 1.0


@pytest.mark.parametrize("cancelled", [0, 1])
def test_a_cancelled_request_does_not_break_its_batch(cancelled: int) -> None:
    model = Model()
    queue = batcher(model)

    async def main() -> Any:
        tasks = [asyncio.ensure_future(queue(images(value))) for value in (1, 2)]
        await asyncio.sleep(0)
        tasks[cancelled].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[cancelled], asyncio.CancelledError)
    assert results[1 - cancelled] == [float(2 - cancelled)]
