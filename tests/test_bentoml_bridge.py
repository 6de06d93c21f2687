"""The one module with BentoML's private names: it matches the installed BentoML, or fails here.

An upgrade that drops the IO descriptor hooks, the generic root model or the patchable model
store breaks these tests, not production.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import bentoml
import pytest
from bentoml.exceptions import InvalidArgument

from serving.bentoml_bridge import BentoMLLayoutError, check_layout
from serving.schema import BatchPredictInput, PredictInput

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_bentoml_has_the_layout_the_bridge_uses() -> None:
    check_layout()


def test_a_missing_io_hook_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    without_hooks = type("IODescriptor", (), {})
    monkeypatch.setattr(bentoml, "IODescriptor", without_hooks)
    with pytest.raises(BentoMLLayoutError, match=r"IODescriptor\.to_http_response is gone"):
        check_layout()


@pytest.mark.parametrize("descriptor", [PredictInput, BatchPredictInput])
def test_bentomls_endpoint_refuses_uploads_the_gate_did_not_parse(descriptor: Any) -> None:
    """Only the gate parses uploads; reaching BentoML's endpoint with one is a wiring mistake."""
    with pytest.raises(InvalidArgument, match="upload gate"):
        asyncio.run(descriptor.from_http_request(object(), object()))


def test_private_bentoml_names_live_only_in_the_bridge() -> None:
    """The issue's grep over the product code: one module."""
    product = [ROOT / "service.py", *ROOT.glob("serving/*.py"), *ROOT.glob("common/*.py")]
    product += list(ROOT.glob("train/*.py"))
    pattern = re.compile(r"_bentoml|bentoml\._internal|_model_store")
    hits = {
        path.relative_to(ROOT).as_posix() for path in product if pattern.search(path.read_text())
    }
    assert hits == {"serving/bentoml_bridge.py"}


def test_bentomls_request_timers_are_cancelled_once_answered() -> None:
    """Each request's timeout timer goes away with the request instead of living 30 s."""
    from bentoml._internal.server.http import traffic

    from serving.bentoml_bridge import cancel_request_timers

    assert cancel_request_timers() is True
    assert cancel_request_timers() is True  # once per process is enough; twice is harmless
    timers: list[asyncio.TimerHandle] = []

    tasks: list[asyncio.Task[Any] | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        tasks.append(asyncio.current_task())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    async def main() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        schedule = loop.call_later

        def recording(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            handle = schedule(delay, callback, *args)
            if getattr(callback, "__name__", "") == "time_out":  # the middleware's timer
                timers.append(handle)
            return handle

        patched: Any = loop
        patched.call_later = recording
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        middleware: Any = traffic.TimeoutMiddleware
        await middleware(app, timeout=30)({"type": "http"}, None, send)
        assert tasks == [asyncio.current_task()]  # no second task per request
        await middleware(slow, timeout=0.01)({"type": "http"}, None, send)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        # A response that started in time is not cut off, however long the rest takes.
        await middleware(started_then_slow, timeout=0.01)({"type": "http"}, None, send)
        return sent

    async def started_then_slow(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"late"})

    sent = asyncio.run(main())
    assert [t.cancelled() for t in timers] == [True, True, True]
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200, 504, 201]
    assert sent[-1]["body"] == b"late"


def test_a_request_cancelled_by_the_server_is_not_answered_504() -> None:
    from bentoml._internal.server.http import traffic

    from serving.bentoml_bridge import cancel_request_timers

    assert cancel_request_timers() is True
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        middleware: Any = traffic.TimeoutMiddleware
        request = asyncio.create_task(middleware(slow, timeout=30)({"type": "http"}, None, send))
        await asyncio.sleep(0.01)
        request.cancel()  # e.g. the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(main())
    assert sent == []


def test_another_timeout_middleware_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from bentoml._internal.server.http import traffic

    from serving.bentoml_bridge import cancel_request_timers

    class Unknown:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            raise AssertionError("not called")

    monkeypatch.setattr(traffic, "TimeoutMiddleware", Unknown)
    assert cancel_request_timers() is False
    assert getattr(traffic, "TimeoutMiddleware") is Unknown  # noqa: B009
    with pytest.raises(BentoMLLayoutError, match="TimeoutMiddleware is not the one"):
        check_layout()
