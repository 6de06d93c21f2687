"""API fuzzing: schemathesis against the live OpenAPI schema of a real ``bentoml serve``.

Schemathesis reads ``/docs.json`` from the running service and, for every operation, sends
generated requests: bodies that match the schema (random bytes as the image file) and, in
negative mode, bodies that break it (missing fields, wrong types, other media types). Every
answer must not be a 5xx, must have the declared content type and, where the schema declares one,
a body that matches it. ``FASHION_SERVE_FUZZ_EXAMPLES`` (default 25) bounds the examples per
operation so the suite stays fast; raise it for a deeper run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from tests.serving_helpers import ROOT, bentoml_serve, import_tiny, serve_env, tiny_model

pytestmark = pytest.mark.slow

MAX_EXAMPLES = int(os.environ.get("FASHION_SERVE_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("bentoml")
    import_tiny(tiny_model(), home)
    log: Path = tmp_path_factory.mktemp("fuzz") / "server.log"
    with bentoml_serve(serve_env(home, workers=1), log) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(served_url: str) -> Any:
    """The schema the live service answers on ``/docs.json``."""
    return schemathesis.openapi.from_url(f"{served_url}/docs.json")


def committed_operations() -> list[Any]:
    """(method, path, mode) for docs/openapi.json's operations (kept equal to the live schema).

    Negative mode needs something to break, so it only runs on operations with a request body.
    """
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    cases = []
    for path, item in committed["paths"].items():
        for method, operation in item.items():
            modes = list(schemathesis.GenerationMode) if "requestBody" in operation else []
            for mode in modes or [schemathesis.GenerationMode.POSITIVE]:
                cases.append(
                    pytest.param(
                        method.upper(), path, mode, id=f"{method.upper()} {path} {mode.value}"
                    )
                )
    return cases


# schemathesis.pytest.from_fixture needs a pytest private attribute that pytest 9 removed, so
# each operation's Hypothesis strategy is driven directly.
@pytest.mark.parametrize(("method", "path", "mode"), committed_operations())
def test_live_schema_holds_under_fuzzing(
    api_schema: Any, served_url: str, method: str, path: str, mode: Any
) -> None:
    operation = api_schema[path][method]
    calls: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        response = case.call_and_validate(base_url=served_url, checks=CHECKS, timeout=30)
        calls.append(response.status_code)

    fuzz()
    assert calls, "schemathesis sent no request"
    assert all(status < 500 for status in calls)
