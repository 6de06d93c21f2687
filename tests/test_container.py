"""scripts/container.py without a container engine: preflight, settings, base recipe, cleanup.

The real build-and-run path is ``make container-smoke`` (part of ``make test``); here a fake
``podman``/``debootstrap`` on a temporary PATH records what the script asks of them, so every
missing piece and every failure path is checked in milliseconds.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from common.settings import SettingsError
from scripts import container
from scripts.container import ContainerError, ContainerSettings
from serving import launch
from tests.serving_helpers import run_ok

FAKE_ENGINE = """#!/bin/sh
# Records its arguments; `image inspect` finds nothing, `run -d` prints an id, `info` works.
echo "$*" >> "{log}"
case "$1 $2" in
  "image inspect") exit 1 ;;
  "run -d") echo cafe0123 ;;
esac
exit 0
"""


def fake_tool(folder: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def tools_on_path(monkeypatch: pytest.MonkeyPatch, folder: Path, **tools: str) -> None:
    """Write each fake tool (name → script) into ``folder`` and put it first on ``PATH``."""
    for name, body in tools.items():
        fake_tool(folder, name, body)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")


def done(returncode: int = 0, stdout: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], returncode, stdout, "")


class Recorder:
    """A ``runner`` that answers from a table of command prefixes and records every call."""

    def __init__(self, answers: dict[str, subprocess.CompletedProcess[str]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(command))
        joined = " ".join(command)
        for prefix, answer in self.answers.items():
            if joined.startswith(prefix):
                return answer
        return done()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ContainerSettings:
    """The repository's container settings, writing below ``tmp_path``."""
    for name in list(os.environ):
        if name.startswith(container.ENV_PREFIX) or name == "CONTAINERS_CONF":
            monkeypatch.delenv(name)
    monkeypatch.setenv(f"{container.ENV_PREFIX}WORK_DIR", str(tmp_path / "work"))
    return container.load_container_settings()


# --------------------------------------------------------------------------- settings


def test_settings_file_and_overrides(settings: ContainerSettings) -> None:
    assert settings.image == "fashion-serve"
    assert settings.podman.runtime == "runc"
    changed = container.load_container_settings(
        environ={
            "FASHION_SERVE_CONTAINER__BASE": "offline",
            "FASHION_SERVE_CONTAINER__OFFLINE_BASE__SUITE": "trixie",
        }
    )
    assert (changed.base, changed.offline_base.suite) == ("offline", "trixie")


def test_bad_setting_names_the_key() -> None:
    with pytest.raises(SettingsError, match="engine"):
        container.load_container_settings(environ={"FASHION_SERVE_CONTAINER__ENGINE": "lxc"})


def test_containers_conf_stays_within_the_hard_limit(settings: ContainerSettings) -> None:
    path = container.write_containers_conf(settings)
    text = path.read_text()
    hard = container.hard_nofile_limit()
    assert f'"nofile={hard}:{hard}"' in text
    assert f'"nproc={settings.podman.nproc}:{settings.podman.nproc}"' in text
    assert 'runtime = "runc"' in text
    env = container.engine_env(settings)
    assert env["CONTAINERS_CONF"] == str(path)


# --------------------------------------------------------------------------- engine


def test_no_engine_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With nothing on PATH, ``build`` ends in one line naming ``make container-deps``."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv(f"{container.ENV_PREFIX}WORK_DIR", str(tmp_path / "work"))
    assert container.main(["build"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no container engine" in err[0] and "make container-deps" in err[0]


def test_docker_client_without_engine_falls_back_to_podman(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "docker", "#!/bin/sh\nexit 1\n")
    fake_tool(bin_dir, "podman", "#!/bin/sh\nexit 0\n")
    which = lambda name: str(bin_dir / name) if (bin_dir / name).exists() else None  # noqa: E731
    runner = Recorder({"docker info": done(1)})
    assert container.find_engine("auto", which, runner) == "podman"
    with pytest.raises(ContainerError, match=r"docker found but not working .*make container"):
        container.find_engine("docker", which, runner)


def test_auto_base_never_touches_the_network(settings: ContainerSettings) -> None:
    env: dict[str, str] = {}
    assert container.choose_base(settings, "docker", env, Recorder({})) == "standard"
    local = Recorder({"podman image inspect python:3.11-slim": done(0)})
    assert container.choose_base(settings, "podman", env, local) == "standard"
    absent = Recorder({"podman image inspect": done(1)})
    assert container.choose_base(settings, "podman", env, absent) == "offline"
    forced = settings.model_copy(update={"base": "offline"})
    assert container.choose_base(forced, "docker", env, Recorder({})) == "offline"


def test_ca_bundle_is_mounted_for_podman_only(settings: ContainerSettings, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_text("certs")
    with_bundle = settings.model_copy(update={"ca_bundle": bundle})
    assert container.ca_mount(with_bundle, "podman") == [
        "--volume",
        f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro",
    ]
    assert container.ca_mount(with_bundle, "docker") == []
    missing = settings.model_copy(update={"ca_bundle": tmp_path / "absent.crt"})
    assert container.ca_mount(missing, "podman") == []


# --------------------------------------------------------------------------- offline base


def test_apt_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    deb822 = tmp_path / "a" / "sources.list.d"
    deb822.mkdir(parents=True)
    (deb822 / "a-vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\n"
    )
    (deb822 / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
    )
    assert container.apt_mirror("bookworm", tmp_path / "a") == "http://mirror.example/debian"
    assert container.apt_mirror("trixie", tmp_path / "a") == container.DEFAULT_MIRROR
    one_line = tmp_path / "b"
    (one_line / "sources.list.d").mkdir(parents=True)
    (one_line / "sources.list").write_text(
        "deb http://security.debian.org/debian-security bookworm-security main\n"
        "deb [arch=amd64] http://ftp.example/debian bookworm main\n"
    )
    assert container.apt_mirror("bookworm", one_line) == "http://ftp.example/debian"
    assert container.apt_mirror("bookworm", tmp_path / "none") == container.DEFAULT_MIRROR


def test_base_tag_follows_the_recipe(settings: ContainerSettings) -> None:
    base = settings.offline_base
    tag = container.base_tag(base, "0.13.9")
    assert tag.startswith(f"{base.repository}:{base.suite}-")
    assert container.base_tag(base, "0.13.9") == tag
    assert container.base_tag(base, "0.14.0") != tag
    more = base.model_copy(update={"packages": [*base.packages, "curl"]})
    assert container.base_tag(more, "0.13.9") != tag


def test_offline_preflight_names_what_is_missing(tmp_path: Path) -> None:
    nothing = lambda name: None  # noqa: E731
    with pytest.raises(ContainerError, match="needs root"):
        container.offline_preflight(nothing, euid=lambda: 1000)
    with pytest.raises(ContainerError, match=r"debootstrap is not installed.*container-deps"):
        container.offline_preflight(nothing, euid=lambda: 0)


def test_failed_debootstrap_tags_nothing(
    settings: ContainerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing debootstrap ends in one line naming its log; no image is imported or tagged."""
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "engine.log"
    tools_on_path(
        monkeypatch,
        bin_dir,
        podman=FAKE_ENGINE.format(log=calls),
        debootstrap="#!/bin/sh\necho 'E: no mirror' >&2\nexit 1\n",
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(
        ContainerError, match=r"debootstrap of bookworm .* failed .*base-build\.log"
    ):
        container.build_base(settings, "podman", dict(os.environ))
    log = (tmp_path / "work" / "base-build.log").read_text()
    assert "E: no mirror" in log
    engine_calls = calls.read_text().splitlines()
    assert not [c for c in engine_calls if c.startswith(("import", "tag"))]


def test_base_that_does_not_run_is_removed_not_tagged(
    settings: ContainerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """debootstrap and the import succeed but the image cannot run Python: only the temporary
    tag existed, and it is removed."""
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "engine.log"
    engine = FAKE_ENGINE.format(log=calls).replace(
        'case "$1 $2" in',
        'case "$1 $2" in\n  "import --change=ENV"*) cat > /dev/null ;;\n  "run --rm") exit 1 ;;',
    )
    tools_on_path(
        monkeypatch, bin_dir, podman=engine, debootstrap='#!/bin/sh\nmkdir -p "$4/usr/bin"\n'
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ContainerError, match="does not run python3 and uv"):
        container.build_base(settings, "podman", dict(os.environ))
    engine_calls = calls.read_text().splitlines()
    imported = next(c for c in engine_calls if c.startswith("import "))
    temporary = imported.split()[-1]
    assert ":building-" in temporary
    assert engine_calls[-1] == f"rmi {temporary}"
    assert not [c for c in engine_calls if c.startswith("tag ")]


def test_base_with_another_python_is_not_tagged(
    settings: ContainerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "engine.log"
    engine = FAKE_ENGINE.format(log=calls).replace(
        'case "$1 $2" in',
        'case "$1 $2" in\n  "import --change=ENV"*) cat > /dev/null ;;\n'
        '  "run --rm") echo "Python 3.13.5"; echo "uv 0.13.9" ;;',
    )
    tools_on_path(
        monkeypatch, bin_dir, podman=engine, debootstrap='#!/bin/sh\nmkdir -p "$4/usr/bin"\n'
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ContainerError, match=r"python3 is 3\.13\.5, bentofile.yaml wants 3\.11"):
        container.build_base(settings, "podman", dict(os.environ))
    assert not [c for c in calls.read_text().splitlines() if c.startswith("tag ")]


def test_model_preflight_says_how_to_get_a_model() -> None:
    missing = Recorder({launch.bentoml_cli(): done(1)})
    with pytest.raises(ContainerError, match=r"not in the BentoML store /x.*make import"):
        container.model_preflight("fashion-classifier:latest", {"BENTOML_HOME": "/x"}, missing)
    container.model_preflight("fashion-classifier:latest", {}, Recorder({}))


# --------------------------------------------------------------------------- running


def test_container_is_removed_when_a_check_fails(
    settings: ContainerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "engine.log"
    tools_on_path(monkeypatch, bin_dir, podman=FAKE_ENGINE.format(log=calls))
    with (
        pytest.raises(ContainerError, match="boom"),
        container.running_container("podman", "img:1", settings.smoke, dict(os.environ)) as box,
    ):
        assert box.url.startswith(f"http://{settings.smoke.host}:")
        raise ContainerError("boom")
    engine_calls = calls.read_text().splitlines()
    assert engine_calls[0].startswith(f"run -d -p {settings.smoke.host}:")
    assert engine_calls[-1] == f"rm -f -t {round(settings.smoke.stop_timeout_s)} cafe0123"


def test_wait_ready_stops_when_the_container_dies() -> None:
    with pytest.raises(ContainerError, match="exited before /readyz"):
        container.wait_ready("http://127.0.0.1:9", 0.0, 1e9, alive=lambda: False)


def test_service_image_is_standard_unless_a_base_is_set() -> None:
    """``image_base`` unset: BentoML's standard image (None); set: that base, no distro layer."""
    code = (
        "import service; image = service.Classifier.image; "
        "print(None if image is None else (image.base_image, image.distro, image.commands))"
    )

    def image_of(base: str) -> str:
        env = {**os.environ, "FASHION_SERVE_SERVING__IMAGE_BASE": base}
        return run_ok([sys.executable, "-c", code], env=env).stdout.strip().splitlines()[-1]

    assert image_of("") == "None"
    assert image_of("localhost/base:1") == "('localhost/base:1', 'none', [])"


@pytest.mark.parametrize("kind", sorted(container.AUX_IMAGES))
def test_aux_image_builds_its_folder_under_its_tag(
    kind: str, settings: ContainerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[list[str]] = []

    def build(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        builds.append(command)
        return done()

    monkeypatch.setattr(container, "base_image_for", lambda *args: "base:1")
    monkeypatch.setattr(subprocess, "run", build)
    tag = container.build_aux_image(settings, kind, "podman", {})
    folder = container.ROOT / "deploy" / container.AUX_IMAGES[kind][0]
    expected = {
        "mlflow-image": settings.mlflow_image,
        "postgres-image": settings.postgres_image,
        "monitoring-image": settings.monitoring_image,
    }[kind]
    (command,) = builds
    assert tag == expected and command[:4] == ["podman", "build", "-t", expected]
    assert "BASE_IMAGE=base:1" in command and command[-1] == str(folder)
    assert (folder / "Containerfile").is_file()
