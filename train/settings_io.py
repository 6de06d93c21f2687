"""YAML files, environment overrides and one-line validation errors, for every settings class.

Shared by the training settings (:mod:`train.config`) and the serving settings (``service.py``),
so both read files, apply ``PREFIX__A__B=value`` overrides and report mistakes the same way.
Torch-free: the serving image imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class SettingsError(ValueError):
    """A settings problem, in one line that names the file, variable or key."""


def one_line(exc: BaseException) -> str:
    """PyYAML and pydantic messages span several lines; errors here are one line."""
    return " ".join(str(exc).split())


def parse_value(raw: str, origin: str) -> Any:
    """Read an override's value as YAML (so ``3``, ``true``, ``[1, 2]`` work); empty is None."""
    try:
        return yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{origin}: value is not valid YAML: {one_line(exc)}") from exc


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: ``{}``)."""
    try:
        content = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise SettingsError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {one_line(exc)}") from exc
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise SettingsError(f"config file {path} must hold a mapping, got {type(content).__name__}")
    return content


def set_nested(tree: dict[str, Any], keys: list[str], value: Any, origin: str) -> None:
    """Set ``tree[k1][k2]...[kn] = value``, creating mappings on the way."""
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SettingsError(f"{origin}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def env_overrides(prefix: str, environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    """``PREFIX_A__B=value`` variables as ``(["a", "b"], parsed value, variable name)``, sorted."""
    found = []
    for name, raw in sorted(environ.items()):
        if name.startswith(prefix):
            keys = [k for k in name[len(prefix) :].lower().split("__") if k]
            found.append((keys, parse_value(raw, f"environment {name}"), name))
    return found


def validate(model: type[ModelT], tree: dict[str, Any], what: str) -> ModelT:
    """Validate ``tree``; the first problem becomes one line naming its dotted key."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SettingsError(
            f"invalid {what} at {where}: {first['msg']} (got {first.get('input')!r})"
        ) from exc
