"""Every shell command in README.md and docs/*.md names things that exist.

The README's client examples and the user guide run for real elsewhere
(``tests/test_service.py::test_readme_examples``, ``tests/test_user_guide.py``); this test
checks every other documented line without running it: make targets are in the Makefile,
``python -m train`` lines parse and their ``--config`` files and ``section.key=value`` overrides
load, settings variables name real keys, scripts and modules exist, curl calls documented
routes, and the tools invoked from ``.venv`` are installed there. A renamed target, setting,
script or route fails here instead of in a reader's terminal.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from common.settings import SettingsError
from serving.settings import ENV_PREFIX as SERVING_ENV_PREFIX
from serving.settings import load_serving_settings
from train.__main__ import _parser
from train.config import ENV_PREFIX as TRAIN_ENV_PREFIX
from train.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = ("bash", "sh", "shell")
# Tools whose lines are checked for the paths they name, not run (they need a cluster, an image
# or a running process).
EXTERNAL_TOOLS = {
    "podman",
    "docker",
    "kubectl",
    "kustomize",
    "kill",
    "export",
    "cd",
    "torchrun",
    "st",
}
# Routes BentoML serves besides the API's own (OpenAPI lists only the API).
SERVER_ROUTES = {"/", "/docs.json", "/metrics", "/livez", "/readyz", "/model"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(where, words)`` for every command line of every shell block, continuations joined."""
    commands: list[tuple[str, list[str]]] = []
    for document in DOCUMENTS:
        text = document.read_text()
        for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
            if language not in SHELL_LANGUAGES:
                continue
            for line in block.replace("\\\n", " ").splitlines():
                for words in simple_commands(line):
                    commands.append((f"{document.name}: {shlex.join(words)}", words))
    return commands


def simple_commands(line: str) -> list[list[str]]:
    """The commands of one shell line: split at ``&&``, ``;``, ``|`` and subshell parentheses."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("&;|()"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    rules = re.findall(r"^([A-Za-z0-9_. -]+):(?!=)", text, flags=re.M)
    return {name for rule in rules for name in rule.split()}


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``NAME=value`` words, and the command after them."""
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words[0].partition("=")
        env[name] = value
        words = words[1:]
    return env, words


def api_routes() -> set[str]:
    schema = json.loads((ROOT / "docs" / "openapi.json").read_text())
    return set(schema["paths"]) | SERVER_ROUTES


def check_settings_variables(env: dict[str, str]) -> None:
    """A ``FASHION_SERVE_...`` variable names a key its loader accepts (value as documented)."""
    serving = {k: v for k, v in env.items() if k.startswith(SERVING_ENV_PREFIX)}
    if serving:
        load_serving_settings(environ=serving)
    for name in env:
        if name.startswith(TRAIN_ENV_PREFIX):
            section_key = name.removeprefix(TRAIN_ENV_PREFIX).lower().replace("__", ".")
            load_settings(overrides=[f"{section_key}={env[name]}"])


def check_train_command(args: list[str]) -> None:
    parsed = _parser().parse_args(args)
    preset = getattr(parsed, "config", None)
    overrides = getattr(parsed, "overrides", None)
    if preset is not None and not (ROOT / preset).exists():
        # A file the guide has the reader write: only its name is documented, not its content.
        preset = None
    if overrides is not None:
        load_settings(preset=ROOT / preset if preset else None, overrides=overrides)


def check_command(words: list[str]) -> None:
    env, words = split_env(words)
    check_settings_variables(env)
    if not words:
        return
    tool, args = words[0], words[1:]
    venv_bin = Path(sys.executable).parent
    if tool == "make":
        names = [a for a in args if not a.startswith("-") and "=" not in a]
        missing = set(names) - make_targets()
        assert not missing, f"no make target {sorted(missing)}"
    elif tool in {".venv/bin/python", "python", "python3"}:
        if args[:2] == ["-m", "train"]:
            check_train_command(args[2:])
        elif args and args[0] == "-m":
            module = args[1].replace(".", "/")
            assert (ROOT / f"{module}.py").exists() or (ROOT / module).is_dir(), args[1]
        else:
            assert (ROOT / args[0]).exists(), f"no script {args[0]}"
    elif tool.startswith(".venv/bin/"):
        assert (venv_bin / Path(tool).name).exists(), f"{tool} is not installed"
    elif tool == "curl":
        urls = [a for a in args if a.startswith("http")]
        assert urls, "curl without a URL"
        for url in urls:
            path = urlparse(url).path or "/"
            assert path in api_routes(), f"{path} is not a route of the service"
    else:
        assert tool in EXTERNAL_TOOLS, f"unknown command {tool!r}: check it here"
        paths = [a for a in args if a.startswith(("deploy/", "configs/", "scripts/"))]
        for path in paths:
            assert (ROOT / path).exists(), f"{path} does not exist"


COMMANDS = documented_commands()


def test_the_documents_have_commands() -> None:
    """The parser finds the README's quick start, so an empty list cannot pass for a clean one."""
    lines = [where for where, _ in COMMANDS]
    assert any(where.startswith("README.md: make run") for where in lines)
    assert len(COMMANDS) > 50


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_names_real_things(where: str, words: list[str]) -> None:
    try:
        check_command(words)
    except SystemExit as exc:
        if exc.code != 0:  # `--help` exits 0
            pytest.fail(f"{where}: exit status {exc.code}")
    except SettingsError as exc:
        pytest.fail(f"{where}: {exc}")


@pytest.mark.parametrize(
    "line",
    [
        "make no-such-target",
        ".venv/bin/python -m train fit train.no_such_key=1",
        ".venv/bin/python -m train frobnicate",
        "FASHION_SERVE_SERVING__NO_SUCH=1 make serve",
        "curl http://127.0.0.1:3000/no_such_route",
        "python scripts/no_such_script.py",
        "frobnicate --now",
    ],
)
def test_a_stale_command_is_caught(line: str) -> None:
    with pytest.raises((AssertionError, SettingsError, SystemExit)):
        check_command(shlex.split(line))


def test_relative_links_resolve() -> None:
    """Every relative link of README.md and docs/*.md points at a file that exists."""
    broken = []
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (document.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{document.name}: {target}")
    assert not broken, broken
