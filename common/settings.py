"""The one settings loader: YAML file → environment overrides → validated pydantic model.

Training (:mod:`train.config`), serving (:mod:`serving.settings`), alerting, containers and
benchmarks all load their settings here, so each reads ``configs/`` (or
``FASHION_SERVE_CONFIG_DIR``) the same way, applies ``PREFIX__A__B=value`` overrides and reports a
mistake in one line that names the file, variable or key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Names the folder of settings files; the project's ``configs/`` when unset.
CONFIG_DIR_ENV = "FASHION_SERVE_CONFIG_DIR"


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


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder holding the settings files (``FASHION_SERVE_CONFIG_DIR`` overrides)."""
    folder = (os.environ if environ is None else environ).get(CONFIG_DIR_ENV)
    return Path(folder) if folder else PROJECT_ROOT / "configs"


def resolve_path(path: Path) -> Path:
    """Relative paths in settings are relative to the project root, not the working directory."""
    return path if path.is_absolute() else PROJECT_ROOT / path


def load_settings_file(
    model: type[ModelT],
    file_name: str,
    env_prefix: str,
    *,
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> ModelT:
    """Read one settings file, apply ``PREFIX_A__B=value`` overrides, validate.

    Args:
        model: The pydantic model the file describes.
        file_name: The file in :func:`config_dir`, e.g. ``serving.yaml``.
        env_prefix: The environment prefix of the overrides, e.g. ``FASHION_SERVE_SERVING__``.
        path: Another file to read instead.
        environ: Environment for the overrides and the config folder; ``os.environ`` by default.
        flags: Top-level values given on a command line, applied last (``None`` values skipped).

    Raises:
        SettingsError: a missing or malformed file, or an unknown key or invalid value.
    """
    env = os.environ if environ is None else environ
    file = path or config_dir(env) / file_name
    tree = read_yaml_mapping(file)
    for keys, value, name in env_overrides(env_prefix, env):
        set_nested(tree, keys, value, name)
    tree.update({key: value for key, value in (flags or {}).items() if value is not None})
    return validate(
        model, tree, f"{file_name.removesuffix('.yaml')} config ({file}, {env_prefix}*)"
    )
