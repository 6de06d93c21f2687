"""Build, run and smoke-test the service's container image, with or without a registry.

``python scripts/container.py conf|base|build|smoke`` (the Makefile's ``container-*`` targets):

- ``conf`` writes the podman/buildah settings this machine needs (``containers.conf``: runtime,
  ulimits within the host's hard limits) and prints its path; the Makefile exports it as
  ``CONTAINERS_CONF``.
- ``base`` makes the offline base image: ``debootstrap --variant=minbase`` from the Debian mirror
  apt uses, trimmed, with ``uv`` copied in, imported with ``podman import``. Cached by a tag that
  hashes its recipe; built under a temporary tag and retagged only once it runs Python and uv.
- ``build`` runs ``bentoml build`` and ``bentoml containerize`` (standard BentoML base, or the
  offline one through ``image_base`` in ``configs/serving.yaml``) and tags ``<image>:latest``.
- ``smoke`` imports a tiny model into a temporary BentoML home (``--tiny``) or uses the store's,
  builds a throw-away image, runs it on loopback and checks ``/readyz``, ``/predict`` on a real
  PNG, ``/batch_predict`` and ``/metrics``; it prints the image size and the seconds from
  container start to ready, and removes the container and the image on every exit path.

Settings: ``configs/container.yaml`` with ``FASHION_SERVE_CONTAINER__KEY`` overrides. Every
missing piece (engine, debootstrap, model, a failed base build) ends in one line saying what is
missing and how to get it, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `train` importable
    sys.path.insert(0, str(ROOT))

from common.settings import SettingsError, load_settings_file  # noqa: E402
from serving.launch import ServeError, bentoml_cli, default_store_home, free_port  # noqa: E402
from serving.launch import wait_ready as wait_readyz  # noqa: E402

ENV_PREFIX = "FASHION_SERVE_CONTAINER__"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Bump when the base recipe changes in a way its settings do not show (the tag hashes it).
BASE_RECIPE_VERSION = "1"

Runner = Callable[..., subprocess.CompletedProcess[str]]


class ContainerError(RuntimeError):
    """Something needed is missing or failed; the message is one line saying how to fix it."""


# --------------------------------------------------------------------------- settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PodmanSettings(_Strict):
    """podman/buildah engine settings (``containers.conf``)."""

    runtime: str
    nproc: int = Field(ge=64)


class OfflineBaseSettings(_Strict):
    """The Debian base made with debootstrap."""

    repository: str
    suite: str
    mirror: str | None
    packages: list[str]
    trim: list[str]
    env: dict[str, str]


class SmokeSettings(_Strict):
    """What the smoke test sends and the goals it prints."""

    host: str
    container_port: int = Field(ge=1, le=65535)
    image_file: Path
    ready_timeout_s: float = Field(gt=0)
    ready_goal_s: float = Field(gt=0)
    size_goal_mb: float = Field(gt=0)
    request_timeout_s: float = Field(gt=0)
    stop_timeout_s: float = Field(ge=0)


class ContainerSettings(_Strict):
    """Everything in ``configs/container.yaml``."""

    image: str
    mlflow_image: str
    postgres_image: str
    monitoring_image: str
    engine: str = Field(pattern=r"^(auto|docker|podman)$")
    base: str = Field(pattern=r"^(auto|standard|offline)$")
    ca_bundle: Path | None
    work_dir: Path
    podman: PodmanSettings
    offline_base: OfflineBaseSettings
    smoke: SmokeSettings


#: ``configs/container.yaml`` (or ``path=``) with ``FASHION_SERVE_CONTAINER__A__B`` overrides
#: (``environ=``); raises ``SettingsError`` for a missing or malformed file or an invalid value.
load_container_settings = functools.partial(
    load_settings_file, ContainerSettings, "container.yaml", ENV_PREFIX
)


def work_dir(settings: ContainerSettings) -> Path:
    """The folder for logs and generated files (created)."""
    folder = settings.work_dir if settings.work_dir.is_absolute() else ROOT / settings.work_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- engine


def run(
    command: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` capturing its output (text)."""
    return subprocess.run(
        list(command),
        check=check,
        capture_output=True,
        text=True,
        env=None if env is None else dict(env),
        timeout=timeout,
    )


def engine_answers(engine: str, runner: Runner = run) -> bool:
    """Whether ``engine info`` works (a docker client without a running engine does not)."""
    try:
        return runner([engine, "info"], check=False, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_engine(
    choice: str,
    which: Callable[[str], str | None] = shutil.which,
    runner: Runner = run,
) -> str:
    """The container engine to build and run with: ``docker`` or ``podman``.

    Raises:
        ContainerError: none is installed and working.
    """
    candidates = ["docker", "podman"] if choice == "auto" else [choice]
    for engine in candidates:
        if which(engine) and engine_answers(engine, runner):
            return engine
    found = [engine for engine in candidates if which(engine)]
    if found:
        problem = f"{' and '.join(found)} found but not working (`{found[0]} info` fails)"
    else:
        problem = f"no container engine ({' or '.join(candidates)}) on PATH"
    raise ContainerError(
        f"{problem}: run `make container-deps` (Debian's podman, buildah, runc as root) "
        "or install and start Docker"
    )


def hard_nofile_limit() -> int:
    """The host's hard limit on open files (``ulimit -Hn``); podman may not exceed it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # "unlimited": podman's own default (2**20) is then allowed.
    return 1 << 20 if hard == resource.RLIM_INFINITY else int(hard)


def containers_conf_text(podman: PodmanSettings, nofile: int) -> str:
    """``containers.conf`` for podman/buildah on this machine."""
    return (
        "# Written by scripts/container.py conf from configs/container.yaml; do not edit.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", '
        f'"nproc={podman.nproc}:{podman.nproc}"]\n'
        "\n[engine]\n"
        f'runtime = "{podman.runtime}"\n'
    )


def write_containers_conf(settings: ContainerSettings) -> Path:
    """Write ``<work_dir>/containers.conf`` and return its path."""
    path = work_dir(settings) / "containers.conf"
    path.write_text(containers_conf_text(settings.podman, hard_nofile_limit()))
    return path


def engine_env(
    settings: ContainerSettings, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for engine and BentoML commands: ``CONTAINERS_CONF`` set if unset."""
    env = dict(os.environ)
    if not env.get("CONTAINERS_CONF"):
        env["CONTAINERS_CONF"] = str(write_containers_conf(settings))
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    env.update(extra or {})
    return env


def image_exists(engine: str, tag: str, env: Mapping[str, str], runner: Runner = run) -> bool:
    """Whether ``tag`` is in the engine's local storage."""
    return runner([engine, "image", "inspect", tag], check=False, env=env).returncode == 0


def standard_base_image(python_version: str) -> str:
    """BentoML's base image for ``python_version`` (what the standard path pulls)."""
    return f"python:{python_version}-slim"


def bentofile_python_version(bentofile: Path = ROOT / "bentofile.yaml") -> str:
    """``docker.python_version`` of ``bentofile.yaml``."""
    data = yaml.safe_load(bentofile.read_text())
    return str(data["docker"]["python_version"])


def ca_mount(settings: ContainerSettings, engine: str) -> list[str]:
    """``--volume`` arguments putting the host's CA bundle read-only into podman build steps."""
    if engine != "podman" or settings.ca_bundle is None or not settings.ca_bundle.exists():
        return []
    return ["--volume", f"{settings.ca_bundle}:/etc/ssl/certs/ca-certificates.crt:ro"]


def choose_base(
    settings: ContainerSettings, engine: str, env: Mapping[str, str], runner: Runner = run
) -> str:
    """``standard`` or ``offline``, resolving ``auto`` without touching the network.

    ``auto`` keeps BentoML's standard path for a Docker engine (which normally has a registry)
    or when its base image is already local; otherwise it builds the Debian base here.
    """
    if settings.base != "auto":
        return settings.base
    if engine == "docker":
        return "standard"
    local = image_exists(engine, standard_base_image(bentofile_python_version()), env, runner)
    return "standard" if local else "offline"


# --------------------------------------------------------------------------- offline base


def apt_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive apt uses here for ``suite`` (so the base builds wherever apt works).

    Reads deb822 ``*.sources`` and one-line ``sources.list`` entries; a security archive or one
    without ``suite`` (another distribution, a vendor repository) is skipped. None: the default.
    """
    for file in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in file.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1)
                for line in stanza.splitlines()
                if ":" in line and not line.startswith("#")
            )
            uris = fields.get("URIs", "").split()
            if (
                "deb" in fields.get("Types", "").split()
                and suite in fields.get("Suites", "").split()
                and uris
                and "security" not in uris[0]
            ):
                return uris[0].rstrip("/")
    for file in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]:
        if not file.exists():
            continue
        for line in file.read_text().splitlines():
            match = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if match and match.group(2) == suite and "security" not in match.group(1):
                return match.group(1).rstrip("/")
    return DEFAULT_MIRROR


def uv_binary(which: Callable[[str], str | None] = shutil.which) -> Path:
    """The ``uv`` next to this Python (the dev extra installs it), else the one on PATH.

    Raises:
        ContainerError: no uv.
    """
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return beside
    found = which("uv")
    if found:
        return Path(found)
    raise ContainerError("no uv found: run `make setup-dev` (the dev extra installs uv into .venv)")


def uv_version(uv: Path, runner: Runner = run) -> str:
    """``uv --version``'s version number."""
    return runner([str(uv), "--version"]).stdout.split()[1]


def base_tag(base: OfflineBaseSettings, uv_ver: str) -> str:
    """``<repository>:<suite>-<hash>``: the hash covers everything that shapes the image."""
    recipe = json.dumps(
        [BASE_RECIPE_VERSION, base.suite, base.packages, base.trim, base.env, uv_ver],
        sort_keys=True,
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"{base.repository}:{base.suite}-{digest}"


def offline_preflight(
    which: Callable[[str], str | None] = shutil.which, euid: Callable[[], int] = os.geteuid
) -> None:
    """Check what building the offline base needs: root and debootstrap.

    Raises:
        ContainerError: one of them is missing.
    """
    if euid() != 0:
        raise ContainerError(
            "the offline base needs root (debootstrap chroots): run as root, or set "
            "FASHION_SERVE_CONTAINER__BASE=standard where a registry is reachable"
        )
    if not which("debootstrap"):
        raise ContainerError(
            "debootstrap is not installed: run `make container-deps` (apt-get install debootstrap)"
        )


def build_base(
    settings: ContainerSettings, engine: str, env: Mapping[str, str], runner: Runner = run
) -> str:
    """Make the offline Debian base image unless its tag is already there; return the tag.

    Raises:
        ContainerError: debootstrap, the import or the check of the new image failed (the log
            is named; nothing is tagged as the base).
    """
    base = settings.offline_base
    uv = uv_binary()
    tag = base_tag(base, uv_version(uv, runner))
    if image_exists(engine, tag, env, runner):
        return tag
    offline_preflight()
    mirror = base.mirror or apt_mirror(base.suite)
    log = work_dir(settings) / "base-build.log"
    temporary = f"{base.repository}:building-{uuid.uuid4().hex[:8]}"
    print(f"building the offline base {tag} (debootstrap {base.suite} from {mirror}; log {log})")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fashion-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            with log.open("w") as sink:
                debootstrap = [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(base.packages)}",
                    base.suite,
                    str(rootfs),
                    mirror,
                ]
                done = subprocess.run(debootstrap, stdout=sink, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise ContainerError(
                    f"debootstrap of {base.suite} from {mirror} failed (exit {done.returncode}): "
                    f"see {log}; set offline_base.mirror in configs/container.yaml to a "
                    "reachable Debian mirror"
                )
            for relative in base.trim:
                target = rootfs / relative
                if target.is_dir():
                    shutil.rmtree(target)
                    target.mkdir()
            (rootfs / "usr/local/bin").mkdir(parents=True, exist_ok=True)
            shutil.copy2(uv, rootfs / "usr/local/bin/uv")
            changes = [f"--change=ENV {key}={value}" for key, value in base.env.items()]
            with subprocess.Popen(
                ["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
            ) as tar:
                imported = subprocess.run(
                    [engine, "import", *changes, '--change=CMD ["/bin/bash"]', "-", temporary],
                    stdin=tar.stdout,
                    capture_output=True,
                    text=True,
                    env=dict(env),
                )
            if imported.returncode != 0 or tar.returncode != 0:
                raise ContainerError(
                    f"{engine} import of the base failed: {imported.stderr.strip()[-300:]}"
                )
            check = runner(
                [engine, "run", "--rm", temporary, "sh", "-c", "python3 --version && uv --version"],
                check=False,
                env=env,
            )
            if check.returncode != 0:
                raise ContainerError(
                    f"the new base does not run python3 and uv: {check.stderr.strip()[-300:]}"
                )
            wanted = bentofile_python_version()
            found = check.stdout.split()[1] if check.stdout.startswith("Python ") else "?"
            if not found.startswith(f"{wanted}."):
                raise ContainerError(
                    f"{base.suite}'s python3 is {found}, bentofile.yaml wants {wanted}: choose "
                    "offline_base.suite to match docker.python_version"
                )
            runner([engine, "tag", temporary, tag], env=env)
        finally:
            runner([engine, "rmi", temporary], check=False, env=env)
    print(f"built {tag} in {time.monotonic() - started:.0f} s")
    return tag


# --------------------------------------------------------------------------- service image


def model_preflight(model_tag: str, env: Mapping[str, str], runner: Runner = run) -> None:
    """Check that the served model is in the BentoML store ``bentoml build`` will read.

    Raises:
        ContainerError: it is not.
    """
    found = runner([bentoml_cli(), "models", "get", model_tag], check=False, env=env)
    if found.returncode != 0:
        home = default_store_home(env)
        raise ContainerError(
            f"model {model_tag} is not in the BentoML store {home}: run `make import` "
            "(or `make run`) first, or `make container-smoke` for a tiny test model"
        )


def served_model_tag(env: Mapping[str, str]) -> str:
    """The model the service would serve (:func:`serving.lineage.served_tag`) for ``env``.

    Read from the store ``env`` names (``BENTOML_HOME``, default ``~/bentoml``) with its
    ``FASHION_SERVE_SERVING__`` overrides; ``<model_name>@<alias>`` when that store has no
    import of the alias, so the preflight names what is missing.
    """
    from serving.bentoml_bridge import model_store_at
    from serving.lineage import ServedModelError, served_tag
    from serving.settings import load_serving_settings

    settings = load_serving_settings(environ=env)
    home = Path(env.get("BENTOML_HOME", "~/bentoml")).expanduser()
    try:
        with model_store_at(home):
            return served_tag(settings)
    except ServedModelError:
        return f"{settings.model_name}@{settings.model_alias}"


def build_image(
    settings: ContainerSettings,
    engine: str,
    env: Mapping[str, str],
    image: str | None = None,
    runner: Runner = run,
) -> str:
    """``bentoml build`` + ``bentoml containerize``; return the image tag (``name:version``).

    Raises:
        ContainerError: the model is missing, or the build failed (BentoML's output is shown).
    """
    model_preflight(served_model_tag(env), env, runner)
    extra: dict[str, str] = {}
    base = choose_base(settings, engine, env, runner)
    if base == "offline":
        extra["FASHION_SERVE_SERVING__IMAGE_BASE"] = build_base(settings, engine, env, runner)
    build_env = {**env, **extra}
    built = runner(
        [bentoml_cli(), "build", "-f", "bentofile.yaml", "--output", "tag", str(ROOT)],
        check=False,
        env=build_env,
    )
    if built.returncode != 0:
        raise ContainerError(f"bentoml build failed: {built.stderr.strip()[-500:]}")
    bento_tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name = image or settings.image
    target = f"{name}:{bento_tag.split(':')[1]}"
    command = [bentoml_cli(), "containerize", bento_tag, "--backend", engine, "-t", target]
    for option in ca_mount(settings, engine)[1::2]:
        command += ["--opt", f"volume={option}"]
    log = work_dir(settings) / "containerize.log"
    print(f"containerizing {bento_tag} as {target} ({base} base; log {log})")
    with log.open("w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=build_env)
    if done.returncode != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-5:])
        raise ContainerError(f"bentoml containerize failed (see {log}): {tail[-500:]}")
    return target


def base_image_for(
    settings: ContainerSettings, engine: str, env: Mapping[str, str], runner: Runner = run
) -> str:
    """The base for images of our own: the offline one, or BentoML's standard one."""
    if choose_base(settings, engine, env, runner) == "offline":
        return build_base(settings, engine, env, runner)
    return standard_base_image(bentofile_python_version())


#: Images of our own beside the service: subcommand -> (its folder in deploy/, the setting that
#: names its tag).
AUX_IMAGES = {
    "mlflow-image": ("mlflow-server", "mlflow_image"),
    "postgres-image": ("postgres", "postgres_image"),
    "monitoring-image": ("monitoring", "monitoring_image"),
}


def build_aux_image(
    settings: ContainerSettings,
    kind: str,
    engine: str,
    env: Mapping[str, str],
    runner: Runner = run,
) -> str:
    """Build ``deploy/<folder>/Containerfile`` (MLflow, PostgreSQL, monitoring) on our base; its tag.

    Raises:
        ContainerError: the build failed (the log is named).
    """
    folder, tag_setting = AUX_IMAGES[kind]
    tag: str = getattr(settings, tag_setting)
    base = base_image_for(settings, engine, env, runner)
    context = ROOT / "deploy" / folder
    command = [engine, "build", "-t", tag, "--build-arg", f"BASE_IMAGE={base}"]
    command += [*ca_mount(settings, engine), "-f", str(context / "Containerfile"), str(context)]
    log = work_dir(settings) / f"{kind}.log"
    print(f"building {tag} on {base} (log {log})")
    with log.open("w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=dict(env))
    if done.returncode != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        raise ContainerError(f"building {tag} failed (see {log}): {tail[-400:]}")
    return tag


def image_size_mb(engine: str, tag: str, env: Mapping[str, str], runner: Runner = run) -> float:
    """The image's size in MB (10^6 bytes) as the engine reports it."""
    out = runner([engine, "image", "inspect", tag, "--format", "{{.Size}}"], env=env).stdout
    return int(out.strip()) / 1e6


# --------------------------------------------------------------------------- smoke test


def import_tiny_model(home: Path) -> str:
    """Import the tiny random model of :mod:`train.tiny` into the BentoML store at ``home``."""
    from train.tiny import tiny_model_in  # torch: only for --tiny

    return tiny_model_in(home)


@dataclass(frozen=True)
class Running:
    """A started container."""

    engine: str
    container: str
    url: str
    started: float  # time.monotonic() just before `run`
    env: Mapping[str, str]

    def alive(self) -> bool:
        """Whether the container is still running."""
        state = run(
            [self.engine, "inspect", self.container, "--format", "{{.State.Running}}"],
            check=False,
            env=self.env,
        )
        return state.stdout.strip() == "true"

    def logs(self, lines: int = 20) -> str:
        """The last ``lines`` lines of its output."""
        done = run(
            [self.engine, "logs", "--tail", str(lines), self.container], check=False, env=self.env
        )
        return done.stdout + done.stderr


@contextlib.contextmanager
def running_container(
    engine: str, image: str, smoke_cfg: SmokeSettings, env: Mapping[str, str]
) -> Iterator[Running]:
    """Start ``image`` on ``smoke_cfg.host`` with a free port; removed on exit, whatever happened."""
    port = free_port(smoke_cfg.host)
    started = time.monotonic()
    created = run(
        [engine, "run", "-d", "-p", f"{smoke_cfg.host}:{port}:{smoke_cfg.container_port}", image],
        check=False,
        env=env,
    )
    if created.returncode != 0:
        raise ContainerError(f"{engine} run {image} failed: {created.stderr.strip()[-300:]}")
    container = created.stdout.strip().splitlines()[-1]
    try:
        yield Running(engine, container, f"http://{smoke_cfg.host}:{port}", started, env)
    finally:
        stop = ["-t", str(round(smoke_cfg.stop_timeout_s))]
        run([engine, "rm", "-f", *stop, container], check=False, env=env)


def wait_ready(url: str, started: float, timeout_s: float, alive: Callable[[], bool]) -> float:
    """Poll ``/readyz`` until 200 (:func:`serving.launch.wait_ready`); seconds since ``started``.

    Raises:
        ContainerError: the container exited or was not ready in time.
    """
    try:
        return wait_readyz(url, timeout_s, alive, started)
    except ServeError as exc:
        raise ContainerError(str(exc)) from exc


def check_endpoints(url: str, png: bytes, timeout_s: float) -> dict[str, Any]:
    """``/livez``, ``/predict``, ``/batch_predict``, a bad upload and ``/metrics``.

    Returns:
        The labels answered.

    Raises:
        ContainerError: an answer is not what the API promises.
    """
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        live = client.get("/livez")
        if live.status_code != 200:
            raise ContainerError(f"/livez answered {live.status_code}")
        one = client.post("/predict", files={"image": ("item.png", png, "image/png")})
        if one.status_code != 200 or "label" not in one.json():
            raise ContainerError(f"/predict answered {one.status_code}: {one.text[:300]}")
        files = [("images", (f"item{i}.png", png, "image/png")) for i in range(3)]
        many = client.post("/batch_predict", files=files)
        if many.status_code != 200 or len(many.json()) != 3:
            raise ContainerError(f"/batch_predict answered {many.status_code}: {many.text[:300]}")
        bad = client.post("/predict", files={"image": ("x.png", b"not an image", "image/png")})
        if bad.status_code != 415 or bad.json().get("kind") != "not_an_image":
            raise ContainerError(f"a non-image got {bad.status_code}: {bad.text[:300]}")
        metrics = client.get("/metrics")
        if metrics.status_code != 200 or "fashion_serve_predictions" not in metrics.text:
            raise ContainerError(
                f"/metrics lacks fashion_serve_predictions ({metrics.status_code})"
            )
    return {"label": one.json()["label"], "batch_labels": [p["label"] for p in many.json()]}


def check_image_contents(engine: str, image: str, env: Mapping[str, str]) -> str:
    """The image's user must not be root, and its Python must not have torch or MLflow.

    Returns:
        The user the image runs as.

    Raises:
        ContainerError: root, or torch/MLflow installed.
    """
    user = run([engine, "image", "inspect", image, "--format", "{{.Config.User}}"], env=env)
    name = user.stdout.strip()
    if name in {"", "root", "0"}:
        raise ContainerError(f"{image} runs as root")
    probe = (
        "import importlib.util as u, sys; "
        "bad = [m for m in ('torch', 'mlflow') if u.find_spec(m)]; "
        "print(' '.join(bad)); sys.exit(1 if bad else 0)"
    )
    found = run(
        [engine, "run", "--rm", "--entrypoint", "python", image, "-c", probe], check=False, env=env
    )
    if found.returncode != 0:
        raise ContainerError(f"{image} holds {found.stdout.strip() or found.stderr.strip()[-200:]}")
    return name


def smoke(
    settings: ContainerSettings, tiny: bool, engine_choice: str | None = None
) -> dict[str, Any]:
    """Build a throw-away image, run it on loopback, check every endpoint, clean up.

    Returns:
        The measurements (also printed).
    """
    engine = find_engine(engine_choice or settings.engine)
    smoke_cfg = settings.smoke
    png_path = (
        smoke_cfg.image_file if smoke_cfg.image_file.is_absolute() else ROOT / smoke_cfg.image_file
    )
    png = png_path.read_bytes()
    results: dict[str, Any] = {"engine": engine}
    with tempfile.TemporaryDirectory(prefix="fashion-smoke-") as tmp:
        extra: dict[str, str] = {}
        if tiny:
            home = Path(tmp) / "bentoml"
            extra["BENTOML_HOME"] = str(home)
            extra["FASHION_SERVE_SERVING__MODEL_TAG"] = import_tiny_model(home)
        env = engine_env(settings, extra)
        image = f"{settings.image}-smoke-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        tag = ""
        try:
            tag = build_image(settings, engine, env, image=image)
            results["build_s"] = round(time.monotonic() - started, 1)
            results["image_mb"] = round(image_size_mb(engine, tag, env), 1)
            results["user"] = check_image_contents(engine, tag, env)
            with running_container(engine, tag, smoke_cfg, env) as box:
                try:
                    ready = wait_ready(box.url, box.started, smoke_cfg.ready_timeout_s, box.alive)
                    results["ready_s"] = round(ready, 2)
                    results.update(check_endpoints(box.url, png, smoke_cfg.request_timeout_s))
                except ContainerError:
                    sys.stderr.write(box.logs())
                    raise
        finally:
            if tag:
                run([engine, "rmi", "-f", tag], check=False, env=env)
    # Timings on a shared machine mean little without its load.
    results["load_average"] = round(os.getloadavg()[0], 1)
    print(
        f"container smoke test passed ({engine}): image {results['image_mb']} MB "
        f"(goal <= {smoke_cfg.size_goal_mb:.0f}), start to /readyz {results['ready_s']} s "
        f"(goal <= {smoke_cfg.ready_goal_s:.0f}), build {results['build_s']} s, "
        f"load average {results['load_average']}, user {results['user']}, "
        f"/predict -> {results['label']}"
    )
    return results


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with one line on stderr for a known problem)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["auto", "docker", "podman"], default=None)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("conf", help="write containers.conf for podman/buildah; print its path")
    commands.add_parser("base", help="build (or reuse) the offline Debian base; print its tag")
    commands.add_parser("build", help="bentoml build + containerize; print the image tag")
    for kind in AUX_IMAGES:
        commands.add_parser(kind, help=f"build deploy/{AUX_IMAGES[kind][0]}'s image for compose")
    smoke_parser = commands.add_parser("smoke", help="build, run and check a throw-away image")
    smoke_parser.add_argument(
        "--tiny", action="store_true", help="serve a tiny random model from a temporary store"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_container_settings()
        if args.command == "conf":
            print(write_containers_conf(settings))
            return 0
        if args.command == "smoke":
            smoke(settings, tiny=args.tiny, engine_choice=args.engine)
            return 0
        engine = find_engine(args.engine or settings.engine)
        env = engine_env(settings)
        if args.command == "base":
            print(build_base(settings, engine, env))
        elif args.command in AUX_IMAGES:
            print(build_aux_image(settings, args.command, engine, env))
        else:
            tag = build_image(settings, engine, env)
            latest = f"{tag.split(':')[0]}:latest"
            run([engine, "tag", tag, latest], env=env)
            print(f"built {tag} (also {latest}), {image_size_mb(engine, tag, env):.0f} MB")
    except (ContainerError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
