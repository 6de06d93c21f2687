"""Write the service's OpenAPI schema to ``docs/openapi.json`` (``make openapi``).

``python scripts/export_openapi.py [--output PATH]``. The schema is what a running service answers
on ``GET /docs.json``: BentoML builds it from the ``Classifier`` service definition (API names,
input and output models, docstrings) and :mod:`serving.openapi` completes it with the upload
gate's statuses and constraints, so no model has to be trained or imported to export it.
The JSON is indented and key-sorted, so that a change to the API shows up as a readable diff;
``tests/test_service.py`` checks the file against a live server.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "openapi.json"


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI schema of ``service:Classifier``, as plain JSON types."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    service = importlib.import_module("service")
    from serving.openapi import service_document

    document: dict[str, Any] = service_document(
        service.Classifier, max_images=service.SETTINGS.limits.max_images_per_batch
    )
    return document


def render(schema: dict[str, Any]) -> str:
    """Indented, key-sorted JSON with a final newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Write the service's OpenAPI schema.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    output: Path = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(openapi_schema()))
    print(f"OpenAPI schema written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
