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
