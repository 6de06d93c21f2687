"""Every use of a private BentoML name, in one place, each checked against the installed BentoML.

Checked against BentoML 1.4.20-1.4.40 (``CHECKED_VERSIONS``). The public API covers the service,
its APIs, the model store (``bentoml.models`` with ``BENTOML_HOME``) and the worker context
(``bentoml.server_context``); these three needs have no public form:

1. ``_bentoml_sdk.io_models.IORootModel``: a response that is a JSON *array* of predictions.
   Public ``bentoml.IODescriptor`` models are objects only.
2. ``IODescriptor.from_http_request`` / ``to_http_response`` (classmethods BentoML calls, not
   documented): the upload gate parses every upload and answers it itself, so BentoML's own
   endpoint must never parse one (it refuses with 400), and an output is one complete JSON body.
3. ``BentoMLContainer.model_store``: tests and benchmarks that load a store from a folder in a
   process that already has one (``BENTOML_HOME`` is read once, at BentoML's import).

:func:`check_layout` verifies all three against the installed BentoML and raises
:class:`BentoMLLayoutError` naming what changed; ``tests/test_bentoml_bridge.py`` runs it, so an
upgrade that breaks the bridge fails CI instead of slowing or breaking production.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import bentoml
from _bentoml_sdk.io_models import IORootModel  # type: ignore[import-untyped]
from bentoml.exceptions import InvalidArgument

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
    """Make ``home``'s model store BentoML's store in this process for a while (need 4).

    A process that starts with ``BENTOML_HOME`` set needs none of this; tests and benchmarks
    that switch stores inside one process do.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield
