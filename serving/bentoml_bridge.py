"""Every use of a private BentoML name, in one place, each checked against the installed BentoML.

Checked against BentoML 1.4.20-1.4.40 (``CHECKED_VERSIONS``). The public API covers the service,
its APIs, the model store (``bentoml.models`` with ``BENTOML_HOME``) and the worker context
(``bentoml.server_context``); these four needs have no public form:

1. ``_bentoml_sdk.io_models.IORootModel``: a response that is a JSON *array* of predictions.
   Public ``bentoml.IODescriptor`` models are objects only.
2. ``IODescriptor.from_http_request`` / ``to_http_response`` (classmethods BentoML calls, not
   documented): the upload gate has already parsed and validated the body, so the API's input
   takes its pixels from the gate, and its output is written as one complete JSON body.
3. The app factory's ``dispatchers`` (BentoML's adaptive batchers), ``batch_infer(name,
   input_args, input_kwargs)`` and ``_service_instance``: the gate calls the batcher directly,
   skipping BentoML's per-request routing, request and response objects
   (``docs/performance.md``). Where that layout is missing the gate falls back to BentoML's full
   endpoint: :func:`find_api_call` returns ``None``, the service logs it at start-up and
   ``fashion_serve_request_path{path="endpoint"}`` on ``/metrics`` says so.
4. ``BentoMLContainer.model_store``: tests and benchmarks that load a store from a folder in a
   process that already has one (``BENTOML_HOME`` is read once, at BentoML's import).

:func:`check_layout` verifies all four against the installed BentoML and raises
:class:`BentoMLLayoutError` naming what changed; ``tests/test_bentoml_bridge.py`` runs it, so an
upgrade that breaks the bridge fails CI instead of slowing or breaking production.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import bentoml
from _bentoml_sdk.io_models import IORootModel  # type: ignore[import-untyped]

CHECKED_VERSIONS = ("1.4.20", "1.4.40")
#: The parameters of ``ServiceAppFactory.batch_infer`` the direct call relies on.
BATCH_INFER_PARAMETERS = ("self", "name", "input_args", "input_kwargs")

T = TypeVar("T")
ApiCall = Callable[[Any], Coroutine[Any, Any, Any]]


class BentoMLLayoutError(RuntimeError):
    """The installed BentoML is not laid out the way this module relies on."""


def check_layout() -> None:
    """Verify every private name this module uses; raise one error that names what changed.

    Raises:
        BentoMLLayoutError: a name is gone, or ``batch_infer`` takes other parameters.
    """
    problems = []
    from _bentoml_impl.server import app as app_module  # type: ignore[import-untyped]

    factory = getattr(app_module, "ServiceAppFactory", None)
    if factory is None:
        problems.append("_bentoml_impl.server.app.ServiceAppFactory is gone")
    else:
        batch_infer = getattr(factory, "batch_infer", None)
        params = tuple(inspect.signature(batch_infer).parameters) if batch_infer else ()
        if params != BATCH_INFER_PARAMETERS:
            problems.append(
                f"ServiceAppFactory.batch_infer{params} is not {BATCH_INFER_PARAMETERS}"
            )
        source = inspect.getsource(factory)
        for attribute in ("self.dispatchers", "self._service_instance", "api_endpoint_wrapper"):
            if attribute not in source:
                problems.append(f"ServiceAppFactory no longer has {attribute}")
    for hook in ("from_http_request", "to_http_response"):
        if not hasattr(bentoml.IODescriptor, hook):
            problems.append(f"bentoml.IODescriptor.{hook} is gone")
    if not hasattr(IORootModel, "__class_getitem__"):
        problems.append("_bentoml_sdk.io_models.IORootModel is not generic")
    from bentoml._internal.configuration.containers import BentoMLContainer

    if not hasattr(BentoMLContainer.model_store, "patch"):
        problems.append("BentoMLContainer.model_store cannot be patched")
    if problems:
        raise BentoMLLayoutError(
            f"BentoML {bentoml.__version__} (bridge checked against {'-'.join(CHECKED_VERSIONS)}): "
            + "; ".join(problems)
        )


# --------------------------------------------------------------------------- IO descriptors


class GateFedInput(bentoml.IODescriptor):  # type: ignore[misc]
    """An API input whose value the upload gate has already parsed (need 2).

    Subclasses declare the multipart fields for the OpenAPI schema and implement
    :meth:`from_gate`: the field values the gate prepared for the current request.
    """

    @classmethod
    def from_gate(cls) -> dict[str, Any]:
        """The input's fields for the current request."""
        raise NotImplementedError

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> Any:
        """Take the value the gate prepared (the body is already consumed)."""
        return cls.model_construct(**cls.from_gate())


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


# --------------------------------------------------------------------------- the direct call


def find_api_call(app: Any, name: str) -> ApiCall | None:
    """BentoML's own call of API ``name``: its adaptive batcher when batchable (need 3).

    BentoML's route endpoint for an API is a ``functools.partial`` of its app factory's
    ``api_endpoint_wrapper``; the factory owns the batchers (``batch_infer``) and, once the
    worker has started, the service instance. ``None`` where the app is not laid out that way,
    or where ``batch_infer`` takes other parameters (a call would fail on every request).
    """
    for route in getattr(app, "routes", ()):
        endpoint = getattr(route, "endpoint", None)
        if getattr(route, "name", None) == name and isinstance(endpoint, functools.partial):
            factory = getattr(endpoint.func, "__self__", None)
            dispatchers = getattr(factory, "dispatchers", None)
            if not isinstance(dispatchers, dict) or not hasattr(factory, "_service_instance"):
                return None
            if name in dispatchers:
                batch_infer = getattr(type(factory), "batch_infer", None)
                if batch_infer is None or (
                    tuple(inspect.signature(batch_infer).parameters) != BATCH_INFER_PARAMETERS
                ):
                    return None
                return _batched_call(factory, name)
            return _method_call(factory, name)
    return None


def _batched_call(factory: Any, name: str) -> ApiCall:
    async def call(value: Any) -> Any:
        return await factory.batch_infer(name, (value,), {})

    return call


def _method_call(factory: Any, name: str) -> ApiCall:
    # The instance exists once the worker has started (after this lookup, at lifespan start).
    async def call(value: Any) -> Any:
        return await getattr(factory._service_instance, name).local(value)

    return call


# --------------------------------------------------------------------------- model store


@contextlib.contextmanager
def model_store_at(home: Path) -> Iterator[None]:
    """Make ``home``'s model store BentoML's store in this process for a while (need 4).

    A process that starts with ``BENTOML_HOME`` set needs none of this; tests and benchmarks
    that switch stores inside one process do.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield
