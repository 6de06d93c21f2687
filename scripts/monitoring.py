"""Prometheus and Alertmanager on loopback, watching the service: what ``make monitoring`` runs.

``python scripts/monitoring.py [run]`` writes ``prometheus.yml``, ``alertmanager.yml`` and the
alert rules (rendered from ``configs/alerts.yaml``, overrides included) into ``data_dir`` of
``configs/monitoring.yaml``, starts Debian's ``prometheus-alertmanager`` and ``prometheus`` there,
waits for both ``/-/ready`` endpoints, prints their URLs and keeps them running until Ctrl-C (or
until one of them exits), then stops both. ``python scripts/monitoring.py config`` only writes
the files; ``compose-config`` writes them for docker-compose.yaml's services instead
(``<data_dir>/compose``, compose names, container paths). Tests start the same pair with :func:`monitoring_stack`.

Processes are :class:`serving.launch.Server` (own process group, log file, SIGTERM then SIGKILL),
so a Ctrl-C, an error or a test failure always ends them. A missing binary, a bad setting or a
server that does not come up ends in one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `common` importable
    sys.path.insert(0, str(ROOT))

from common.alerts import load_alert_settings  # noqa: E402
from common.prometheus import (  # noqa: E402
    READY_PATH,
    ConfigFiles,
    MonitoringSettings,
    alertmanager_command,
    listen_flag,
    load_monitoring_settings,
    prometheus_command,
    write_compose_configs,
    write_configs,
)
from common.settings import SettingsError  # noqa: E402
from serving.launch import ServeError, Server  # noqa: E402
from train.monitoring import render_prometheus_rules  # noqa: E402

#: Seconds between the liveness checks while ``run`` waits for Ctrl-C.
WATCH_S = 1.0
#: Where each binary comes from, for the error when it is missing.
PACKAGES = {"prometheus": "prometheus", "prometheus-alertmanager": "prometheus-alertmanager"}


class MonitoringError(RuntimeError):
    """A binary is missing or a server did not come up (one line; logs are in the data folder)."""


@dataclass(frozen=True)
class Stack:
    """The running pair: their URLs and the files they were started on."""

    prometheus_url: str
    alertmanager_url: str
    files: ConfigFiles
    servers: tuple[Server, Server]


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        package = PACKAGES.get(Path(name).name, name)
        raise MonitoringError(
            f"{name} not found: apt-get install {package} (make test-deps installs it)"
        )
    return found


@contextlib.contextmanager
def monitoring_stack(
    settings: MonitoringSettings, rules_text: str, env: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """Write the configs, start Alertmanager then Prometheus, wait until both are ready.

    Both are stopped on every exit path.

    Raises:
        MonitoringError: a binary is missing, or a server exited or was not ready in time.
    """
    _binary(settings.prometheus.binary)
    _binary(settings.alertmanager.binary)
    files = write_configs(settings, rules_text)
    environ = dict(os.environ if env is None else env)
    servers: list[Server] = []
    try:
        for name, listen, command in (
            (
                "alertmanager",
                settings.alertmanager,
                alertmanager_command(settings, files),
            ),
            ("prometheus", settings.prometheus, prometheus_command(settings, files)),
        ):
            log = files.folder / f"{name}.log"
            server = Server(
                listen.host, listen.port, environ, log, command, listen_flag, READY_PATH
            )
            servers.append(server)
            try:
                server.wait_ready(settings.ready_timeout_s)
            except ServeError as exc:
                first = str(exc).splitlines()[0]
                raise MonitoringError(f"{name} did not start: {first} (log: {log})") from exc
        alertmanager, prometheus = servers
        yield Stack(prometheus.url, alertmanager.url, files, (alertmanager, prometheus))
    finally:
        for server in reversed(servers):
            server.stop(settings.stop_timeout_s)


def run(settings: MonitoringSettings, rules_text: str) -> int:
    """Start the pair and keep it until Ctrl-C (0) or until one of them exits (1)."""
    with monitoring_stack(settings, rules_text) as stack:
        print(f"prometheus:   {stack.prometheus_url} (scraping {settings.scrape.target})")
        print(f"alertmanager: {stack.alertmanager_url}")
        print(f"configs, data and logs in {stack.files.folder}; Ctrl-C stops both")
        try:
            while all(server.alive() for server in stack.servers):
                time.sleep(WATCH_S)
        except KeyboardInterrupt:
            print("stopping prometheus and alertmanager")
            return 0
        dead = next(server for server in stack.servers if not server.alive())
        print(f"error: {dead.stop(0)}; log: {dead.log}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``run`` (default), ``config`` or ``compose-config``; 2 on a setting, binary or start-up problem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", nargs="?", choices=["run", "config", "compose-config"], default="run"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_monitoring_settings()
        rules_text = render_prometheus_rules(load_alert_settings())
        if args.command in ("config", "compose-config"):
            write = write_compose_configs if args.command == "compose-config" else write_configs
            files = write(settings, rules_text)
            print(f"wrote {files.prometheus}, {files.alertmanager} and {files.rules}")
            return 0
        return run(settings, rules_text)
    except (SettingsError, MonitoringError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during the start-up; both servers are stopped already
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
