"""BentoML's own store, repeatable ``bentoml build``, and the serve-and-wait helper.

- ``bentoml build`` twice in one checkout: both succeed and each Bento holds exactly the files
  ``bentofile.yaml`` names, even with a model store and build output inside the checkout (the old
  ``bentoml_home/`` made the second build package the first, endlessly nested).
- The Makefile exports no ``BENTOML_HOME``: plain ``bentoml`` commands and ``make`` targets use
  the same store (``$BENTOML_HOME`` or ``~/bentoml``), and tests never see the real one.
- :mod:`serving.launch`: ``/readyz`` polling, a server that dies, a stop that ends the group.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from serving import launch
from tests.conftest import SESSION_STORE_PREFIX
from tests.serving_helpers import QuietHandler, stub_http_server
from train.tiny import import_tiny, tiny_model

ROOT = launch.PROJECT_ROOT
BUILD_TIMEOUT_S = 600
#: What ``bentoml build`` copies besides the included files.
BENTO_OWN_FILES = {"bentofile.yaml"}
#: A make rule printing the BENTOML_HOME its recipes get.
SHOW_STORE_RULE = 'show-store: ; @echo "[$$BENTOML_HOME]"'


def project_copy(target: Path) -> Path:
    """The files ``bentoml build`` reads (bentofile, service, serving/, common/, configs/)."""
    target.mkdir()
    shutil.copy(ROOT / "bentofile.yaml", target)
    shutil.copy(ROOT / "service.py", target)
    for folder in ("serving", "common", "configs"):
        shutil.copytree(
            ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    return target


def included_files(project: Path) -> set[str]:
    """The files ``bentofile.yaml``'s ``include`` names less its ``exclude``, relative to ``project``."""
    bentofile = yaml.safe_load((project / "bentofile.yaml").read_text())

    def matching(patterns: list[str]) -> set[str]:
        return {
            path.relative_to(project).as_posix()
            for pattern in patterns
            for path in project.glob(pattern.lstrip("/"))
            if path.is_file()
        }

    return matching(bentofile["include"]) - matching(bentofile["exclude"])


def modules_the_service_imports(env: dict[str, str]) -> set[str]:
    """The project's own Python files that ``import service`` loads."""
    code = (
        "import sys, pathlib, service; root = pathlib.Path.cwd().resolve(); "
        "print('\\n'.join(sorted(pathlib.Path(m.__file__).resolve().relative_to(root).as_posix() "
        "for m in list(sys.modules.values()) if getattr(m, '__file__', None) "
        "and pathlib.Path(m.__file__).resolve().is_relative_to(root) "
        "and 'site-packages' not in m.__file__)))"
    )
    return set(run_in(ROOT, [sys.executable, "-c", code], env).split())


def run_in(folder: Path, command: list[str], env: dict[str, str]) -> str:
    """Run ``command`` in ``folder`` with ``env``; its stdout (it must succeed)."""
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def bentoml_build(project: Path, env: dict[str, str]) -> str:
    """``bentoml build`` in ``project``; the Bento's tag."""
    command = [launch.bentoml_cli(), "build", "-f", "bentofile.yaml", "--output", "tag", "."]
    built = run_in(project, command, env)
    return built.strip().splitlines()[-1].removeprefix("__tag__:")


@pytest.mark.slow
def test_bentoml_build_twice_packages_exactly_the_included_files(tmp_path: Path) -> None:
    """The worst case of old: the store (``bentoml_home/``) and build output in the checkout."""
    project = project_copy(tmp_path / "project")
    home = project / "bentoml_home"
    tag = import_tiny(tiny_model(), home)
    (project / "build" / "containers").mkdir(parents=True)
    shutil.copy(project / "service.py", project / "build" / "containers" / "service.py")
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "FASHION_SERVE_SERVING__MODEL_TAG": tag,
    }
    expected = included_files(project) | BENTO_OWN_FILES
    python_files = {name for name in expected if name.endswith(".py")}
    assert python_files == modules_the_service_imports(env)  # exactly what the service imports
    assert {"service.py", "configs/serving.yaml"} <= expected
    bentos = [bentoml_build(project, env), bentoml_build(project, env)]
    assert bentos[0] != bentos[1]
    for bento in bentos:
        src = home / "bentos" / bento.replace(":", "/") / "src"
        packaged = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
        assert packaged == expected


def test_makefile_leaves_the_store_to_bentoml(tmp_path: Path) -> None:
    """No ``BENTOML_HOME`` from the Makefile: ``make`` and plain ``bentoml`` see one store."""
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    shown = run_in(
        ROOT, ["make", "-s", "--no-print-directory", "--eval", SHOW_STORE_RULE, "show-store"], env
    )
    assert shown.strip() == "[]"
    assert launch.default_store_home(env) == Path.home() / "bentoml"
    assert launch.default_store_home({"BENTOML_HOME": str(tmp_path)}) == tmp_path


def test_tests_never_see_the_real_store() -> None:
    """conftest points ``BENTOML_HOME`` at a throw-away store for the whole session."""
    home = launch.default_store_home()
    assert home != Path.home() / "bentoml"
    assert home.name.startswith(SESSION_STORE_PREFIX)


# --------------------------------------------------------------------------- serving.launch


@pytest.fixture
def readyz_after() -> Iterator[tuple[str, list[int]]]:
    """A loopback server whose ``/readyz`` answers 503 twice, then 200; (URL, statuses sent)."""
    sent: list[int] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server calls it by this name)
            status = 200 if len(sent) >= 2 else 503
            sent.append(status)
            self.send_response(status if self.path == "/readyz" else 404)
            self.end_headers()

    with stub_http_server(Handler) as url:
        yield url, sent


def test_wait_ready_polls_until_200(readyz_after: tuple[str, list[int]]) -> None:
    url, sent = readyz_after
    seconds = launch.wait_ready(url, 30, alive=lambda: True, poll_s=0.01)
    assert sent == [503, 503, 200]
    assert 0 <= seconds < 30


def test_wait_ready_stops_when_the_server_dies_or_times_out() -> None:
    url = f"http://{launch.LOOPBACK}:{launch.free_port()}"  # nothing listens there
    with pytest.raises(launch.ServeError, match="exited before /readyz"):
        launch.wait_ready(url, 30, alive=lambda: False)
    started = time.monotonic()
    with pytest.raises(launch.ServeError, match="did not answer 200 within"):
        launch.wait_ready(url, 0.3, alive=lambda: True, poll_s=0.05)
    assert time.monotonic() - started < 10


FAKE_SERVER = """
import sys, http.server
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
print("fake server up", flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_server_waits_reports_and_stops_its_group(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    command = [sys.executable, "-c", FAKE_SERVER]
    server = launch.Server(launch.LOOPBACK, launch.free_port(), dict(os.environ), log, command)
    try:
        assert server.wait_ready(60) > 0
        server.check_alive()
        assert "fake server up" in server.log_tail()
    finally:
        how = server.stop(10)
    assert how.startswith("stopped by SIGTERM")
    assert server.stop(10) == how  # once
    with pytest.raises(launch.ServeError, match="server exited"):
        server.check_alive()


def test_server_that_exits_fails_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"]
    log = tmp_path / "server.log"
    server = launch.Server(launch.LOOPBACK, launch.free_port(), dict(os.environ), log, command)
    with pytest.raises(launch.ServeError, match=r"exited before /readyz(.|\n)*no model here"):
        server.wait_ready(60)
    assert server.stop(10) == "server had exited by itself (3)"


def test_free_port_is_below_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port that `bind(0)` elsewhere (BentoML's control socket) can never be handed."""
    low = launch._ephemeral_range_start()
    assert low is not None  # Linux: /proc/sys/net/ipv4/ip_local_port_range
    assert all(launch.FIXED_PORTS_FROM <= launch.free_port() < low for _ in range(20))
    # Two candidates, the first taken: the free one is offered, never the taken one.
    base = launch.free_port()
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text(f"{base + 2}\t60999\n")
    monkeypatch.setattr(launch, "EPHEMERAL_RANGE_FILE", range_file)
    monkeypatch.setattr(launch, "FIXED_PORTS_FROM", base)
    with socket.socket() as held:
        held.bind((launch.LOOPBACK, base))
        assert {launch.free_port() for _ in range(10)} == {base + 1}
    # No readable range (another OS, or garbage): the kernel's choice, from its ephemeral range.
    range_file.write_text("not numbers\n")
    assert launch._ephemeral_range_start() is None
    assert launch.free_port() >= low
    monkeypatch.setattr(launch, "EPHEMERAL_RANGE_FILE", tmp_path / "absent")
    assert launch._ephemeral_range_start() is None
