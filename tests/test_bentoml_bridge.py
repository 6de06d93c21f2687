"""The one module with BentoML's private names: it matches the installed BentoML, or fails here.

An upgrade that moves the app factory's batchers, renames ``batch_infer``'s parameters or drops
the IO descriptor hooks breaks these tests, not production.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from _bentoml_impl.server import app as app_module  # type: ignore[import-untyped]
from numpy.typing import NDArray

import service
from serving import bentoml_bridge
from serving.bentoml_bridge import BentoMLLayoutError, check_layout, find_api_call
from serving.gate import ApiKeyGuard, UploadGate
from serving.settings import AuthSettings
from tests import serving_helpers

CLASSIFIER: Any = service.Classifier
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("bentoml")
    serving_helpers.import_tiny(serving_helpers.tiny_model(), home)
    with bentoml_bridge.model_store_at(home):
        yield home


def test_the_installed_bentoml_has_the_layout_the_bridge_uses() -> None:
    check_layout()


def test_a_changed_batch_infer_signature_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    async def batch_infer(self: Any, name: str, args: tuple[Any, ...]) -> Any:
        raise AssertionError("not called")

    monkeypatch.setattr(app_module.ServiceAppFactory, "batch_infer", batch_infer)
    with pytest.raises(BentoMLLayoutError, match=r"batch_infer\('self', 'name', 'args'\)"):
        check_layout()


def test_a_changed_batch_infer_makes_the_gate_fall_back(
    bento_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct call that would fail on every request is never used: the endpoint path is."""
    app = CLASSIFIER.to_asgi()
    assert find_api_call(app, "predict") is not None

    async def batch_infer(self: Any, name: str, args: tuple[Any, ...]) -> Any:
        raise AssertionError("not called")

    monkeypatch.setattr(app_module.ServiceAppFactory, "batch_infer", batch_infer)
    assert find_api_call(app, "predict") is None


def test_a_missing_app_factory_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(app_module, "ServiceAppFactory")
    with pytest.raises(BentoMLLayoutError, match="ServiceAppFactory is gone"):
        check_layout()


def test_private_bentoml_names_live_only_in_the_bridge() -> None:
    """The issue's grep over the product code: one module."""
    product = [ROOT / "service.py", *ROOT.glob("serving/*.py"), *ROOT.glob("common/*.py")]
    product += list(ROOT.glob("train/*.py"))
    pattern = re.compile(r"_bentoml|bentoml\._internal|_model_store")
    hits = {
        path.relative_to(ROOT).as_posix() for path in product if pattern.search(path.read_text())
    }
    assert hits == {"serving/bentoml_bridge.py"}


def test_another_app_layout_is_reported_as_the_endpoint_path() -> None:
    import prometheus_client

    gate = UploadGate(object(), ApiKeyGuard(AuthSettings(), {}))  # type: ignore[arg-type]
    assert gate.report_request_path({"type": "lifespan", "app": object()}) == "endpoint"
    sample = prometheus_client.REGISTRY.get_sample_value
    assert sample("fashion_serve_request_path", {"path": "endpoint"}) == 1
    assert sample("fashion_serve_request_path", {"path": "direct"}) == 0


def test_find_api_call_in_bentomls_app(bento_home: Path) -> None:
    app = CLASSIFIER.to_asgi()
    assert find_api_call(app, "predict") is not None
    assert find_api_call(app, "batch_predict") is not None
    assert find_api_call(app, "livez") is None
    assert find_api_call(object(), "predict") is None


def test_find_api_call_without_batching_calls_the_method() -> None:
    """A non-batchable API (batching off) is called directly, as BentoML's endpoint would."""

    class Method:
        async def local(self, pixels: NDArray[np.float32]) -> list[Any]:
            return [len(pixels)]

    class Factory:
        dispatchers: ClassVar[dict[str, Any]] = {}
        _service_instance = type("Instance", (), {"predict": Method()})()

        async def api_endpoint_wrapper(self, name: str, request: Any) -> None:
            raise AssertionError("not called")

    route = type("Route", (), {})()
    route.name, route.endpoint = (
        "predict",
        functools.partial(Factory().api_endpoint_wrapper, "predict"),
    )
    app = type("App", (), {"routes": [route]})()
    call = find_api_call(app, "predict")
    assert call is not None
    answered: list[Any] = list(asyncio.run(call(np.zeros((3, 1, 2, 2), np.float32))))
    assert answered == [3]
