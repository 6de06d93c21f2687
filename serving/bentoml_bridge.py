"""Every use of a private BentoML name, in one place, each checked against the installed BentoML.

Checked against BentoML 1.4.20-1.4.40 (``CHECKED_VERSIONS``). The public API covers the service,
its APIs, the model store (``bentoml.models`` with ``BENTOML_HOME``) and the worker context
(``bentoml.server_context``); these four needs have no public form:

1. ``_bentoml_sdk.io_models.IORootModel``: a response that is a JSON *array* of predictions.
   Public ``bentoml.IODescriptor`` models are objects only.
2. ``IODescriptor.from_http_request`` / ``to_http_response`` (classmethods BentoML calls, not
   documented): the upload gate parses every upload and answers it itself, so BentoML's own
   endpoint must never parse one (it refuses with 400), and an output is one complete JSON body.
3. ``BentoMLContainer.model_store``: tests and benchmarks that load a store from a folder in a
   process that already has one (``BENTOML_HOME`` is read once, at BentoML's import).
4. ``bentoml._internal.server.http.traffic.TimeoutMiddleware`` (on every request, and there is no
   public way to leave it out): it schedules a ``traffic.timeout`` timer per request and never
   cancels it, so each request leaves a timer, a future and a context alive for 30 s. At 1,700
   requests/s per worker that is ~50,000 live objects, and Python's full garbage collections
   over them stalled the worker for 100 ms and more (the p99). It also runs each request in a
   second task, two event-loop turns more per request. :func:`cancel_request_timers` swaps in a
   subclass with the same 504 that runs the request in its own task and cancels the timer once
   the request is answered; it replaces only the exact code it was checked against and logs a
   warning otherwise.

:func:`check_layout` verifies all four against the installed BentoML and raises
:class:`BentoMLLayoutError` naming what changed; ``tests/test_bentoml_bridge.py`` runs it, so an
upgrade that breaks the bridge fails CI instead of slowing or breaking production.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import bentoml
from _bentoml_sdk.io_models import IORootModel  # type: ignore[import-untyped]
from bentoml.exceptions import InvalidArgument
from loguru import logger
from starlette.responses import JSONResponse

CHECKED_VERSIONS = ("1.4.20", "1.4.40")

T = TypeVar("T")


class BentoMLLayoutError(RuntimeError):
    """The installed BentoML is not laid out the way this module relies on."""


def check_layout() -> None:
    """Verify every private name this module uses; raise one error that names what changed.

    Raises:
        BentoMLLayoutError: a name is gone.
    """
    problems = []
    for hook in ("from_http_request", "to_http_response"):
        if not hasattr(bentoml.IODescriptor, hook):
            problems.append(f"bentoml.IODescriptor.{hook} is gone")
    if not hasattr(IORootModel, "__class_getitem__"):
        problems.append("_bentoml_sdk.io_models.IORootModel is not generic")
    from bentoml._internal.configuration.containers import BentoMLContainer

    if not hasattr(BentoMLContainer.model_store, "patch"):
        problems.append("BentoMLContainer.model_store cannot be patched")
    if _timeout_middleware_to_patch() is None:
        problems.append(
            "bentoml._internal.server.http.traffic.TimeoutMiddleware is not the one "
            "cancel_request_timers replaces"
        )
    if problems:
        raise BentoMLLayoutError(
            f"BentoML {bentoml.__version__} (bridge checked against {'-'.join(CHECKED_VERSIONS)}): "
            + "; ".join(problems)
        )


# --------------------------------------------------------------------------- IO descriptors


class GateFedInput(bentoml.IODescriptor):  # type: ignore[misc]
    """An API input that only the upload gate parses (need 2).

    Subclasses declare the multipart fields for the OpenAPI schema. The gate answers every
    upload itself, so BentoML's endpoint only sees one when the gate is not installed.
    """

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> Any:
        """Refuse: parsing uploads is the gate's job (a wiring mistake if this is reached)."""
        raise InvalidArgument("images must be uploaded through the service's upload gate")


class _Rendered:
    """``to_http_response`` hands the API's return value to the subclass's :meth:`render`."""

    @classmethod
    def render(cls, obj: Any) -> Any:
        """The HTTP response for the API's return value."""
        raise NotImplementedError

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Any:
        """One complete response from :meth:`render`."""
        return cls.render(obj)


class JsonObjectOutput(_Rendered, bentoml.IODescriptor):  # type: ignore[misc]
    """An API output that is a JSON object; subclasses :meth:`render` the response (need 2)."""


class JsonArrayOutput(_Rendered, IORootModel[T], Generic[T]):  # type: ignore[misc]
    """An API output that is a JSON array (needs 1 and 2); subclasses :meth:`render` it."""


# --------------------------------------------------------------------------- model store


@contextlib.contextmanager
def model_store_at(home: Path) -> Iterator[None]:
    """Make ``home``'s model store BentoML's store in this process for a while (need 3).

    A process that starts with ``BENTOML_HOME`` set needs none of this; tests and benchmarks
    that switch stores inside one process do.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield


# --------------------------------------------------------------------------- request timers

#: The lines of BentoML's ``TimeoutMiddleware.__call__`` whose behaviour :func:`cancel_request_timers` keeps.
_TIMEOUT_CALL_LINES = (
    "waiter = loop.create_future()",
    "loop.call_later(self.timeout, self._set_timer_out, waiter)",
    "fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)",
    "if fut.cancel():",
)


def _timeout_middleware_to_patch() -> type | None:
    """BentoML's ``TimeoutMiddleware`` if it is the code :func:`cancel_request_timers` replaces."""
    from bentoml._internal.server.http import traffic

    middleware = getattr(traffic, "TimeoutMiddleware", None)
    if middleware is None:
        return None
    if getattr(middleware, "cancels_its_timer", False):  # already replaced in this process
        return cast(type, middleware)
    try:
        source = inspect.getsource(middleware.__call__)
    except (OSError, TypeError):
        return None
    if not all(line in source for line in _TIMEOUT_CALL_LINES):
        return None
    return cast(type, middleware)


def cancel_request_timers() -> bool:
    """Make BentoML's per-request timeout cancel its timer once the request is answered (need 4).

    Returns whether the patch is in place; ``False`` (with a warning) where BentoML's middleware
    is not the code this was checked against.
    """
    from bentoml._internal.server.http import traffic

    original = _timeout_middleware_to_patch()
    if original is None:
        logger.bind(logger="fashion_serve").warning(
            "BentoML's TimeoutMiddleware is not the one serving.bentoml_bridge knows: its "
            "per-request timers are left as they are (more garbage-collection pauses under load)"
        )
        return False
    if getattr(original, "cancels_its_timer", False):
        return True

    class CancellingTimeout(original):  # type: ignore[misc, valid-type]
        """BentoML's TimeoutMiddleware: a 504 when no response has started in time.

        BentoML's runs every request in a second task and waits for it on a future, which costs
        a task, a future and two more event-loop turns per request; this runs the request in the
        task the server gave it, has the timer cancel that task, and cancels the timer once the
        request is answered.
        """

        cancels_its_timer = True

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] not in ("http", "websocket"):
                await self.app(scope, receive, send)
                return
            task = asyncio.current_task()
            assert task is not None  # an ASGI server runs every request in a task
            started = timed_out = False

            def time_out() -> None:
                nonlocal timed_out
                if not started:
                    timed_out = True
                    task.cancel()

            async def _send(message: Any) -> None:
                nonlocal started
                started = True
                await send(message)

            timer = asyncio.get_running_loop().call_later(self.timeout, time_out)
            try:
                await self.app(scope, receive, _send)
            except asyncio.CancelledError:
                if not timed_out:
                    raise  # cancelled by someone else (the server shutting down)
                task.uncancel()
                body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(body, status_code=504)(scope, receive, send)
            finally:
                timer.cancel()

    setattr(traffic, "TimeoutMiddleware", CancellingTimeout)  # noqa: B010 - a module we patch
    return True
