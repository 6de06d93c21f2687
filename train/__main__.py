"""Command line: ``python -m train [--config F] {data,fit,sweep,...} [--config F] [k=v ...]``.

Only argument handling lives here; each command calls one function of its stage module. Known
failures (config, data, model, tracking, checkpoint, promotion, export) print one ``error:`` line
and exit with status 2 before anything is written. Ctrl-C exits with status 130 and one
``interrupted;`` line that fits the command (only ``fit`` can be resumed). The help users see is
:data:`DESCRIPTION` and each command's one line, not this docstring.

The monitoring commands ``alerts`` (exit 1 when a rule fires) and ``alert-rules`` read
``configs/alerts.yaml`` and ``configs/serving.yaml`` only, and import neither torch nor MLflow.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DESCRIPTION = "Train, track, register and import the image classifier."
EPILOG = """\
settings: configs/*.yaml, then --config FILE, then FASHION_SERVE__SECTION__KEY variables,
then section.key=value arguments (e.g. train.epochs=3).
'python -m train COMMAND --help' shows a command's options."""
CONFIG_HELP = "a preset over configs/*.yaml, e.g. configs/presets/best.yaml"
# Commands that read configs/alerts.yaml and configs/serving.yaml only (no --config).
MONITORING_COMMANDS = ("alerts", "alert-rules")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # --config before the command (`--config F fit`) or after it (`fit --config F`): the
    # command's own option has no default, so it only replaces this one when given.
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config", type=Path, default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP
        )
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="section.key=value",
            help="settings over the YAML files, e.g. train.epochs=3",
        )
        return p

    command("data", "load the data set, write and log its statistics")
    fit = command("fit", "train the configured model in an MLflow run")
    fit.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a checkpoint (file or run folder; default: the latest)",
    )
    fit.add_argument("--run-name", default=None, help="MLflow run name (default: MLflow's)")
    command("sweep", "run the hyper-parameter sweep in configs/sweep.yaml")
    evaluate = command("evaluate", "evaluate a logged or registered model on the test set")
    evaluate.add_argument("--model-uri", default=None, help="default: models:/<name>@champion")
    promote = command("promote", "register the best run and point @champion at it")
    promote.add_argument(
        "--version",
        default=None,
        help="point the champion at this registered version instead (e.g. a rollback)",
    )
    command("report", "print the model table and update the one in README.md")
    imp = command("import", "export the champion to ONNX into the BentoML store")
    imp.add_argument("--model-uri", default=None, help="default: models:/<name>@champion")
    ref = command("reference", "add the drift reference.json to a stored model")
    ref.add_argument("--model-tag", default=None, help="default: the served model (serving.yaml)")
    alerts_help = "check the service logs against configs/alerts.yaml"
    alerts = sub.add_parser(
        "alerts", help=alerts_help, description=f"{alerts_help}; exit status 1 when one fires"
    )
    alerts.add_argument(
        "--logs", action="append", default=[], help="request-log glob (default: serving.yaml's)"
    )
    alerts.add_argument(
        "--predictions",
        action="append",
        default=[],
        help="prediction-data glob (default: serving.yaml's)",
    )
    alerts.add_argument(
        "--reference", type=Path, default=None, help="reference.json (default: the served model's)"
    )
    alerts.add_argument(
        "--now", default=None, help="end of the window, ISO time (default: the current time)"
    )
    alerts.add_argument(
        "--alerts-config", type=Path, default=None, help="default: configs/alerts.yaml"
    )
    rules_help = "write configs/alerts.yaml as Prometheus rules and as a Kubernetes PrometheusRule"
    rules = sub.add_parser("alert-rules", help=rules_help, description=rules_help)
    rules.add_argument("--output", type=Path, default=Path("deploy/prometheus/alerts.yml"))
    rules.add_argument("--k8s-output", type=Path, default=Path("deploy/k8s/prometheusrule.yaml"))
    rules.add_argument(
        "--check", action="store_true", help="only compare with --output; exit 1 if it differs"
    )
    rules.add_argument(
        "--alerts-config", type=Path, default=None, help="default: configs/alerts.yaml"
    )
    return parser


def _monitoring(args: argparse.Namespace) -> int:
    """``alerts`` and ``alert-rules``: no training settings, no torch."""
    from common.alerts import load_alert_settings
    from common.settings import SettingsError
    from train.monitoring import (
        parse_time,
        render_prometheus_rule_manifest,
        render_prometheus_rules,
        run_alerts,
    )

    try:
        settings = load_alert_settings(args.alerts_config)
        if args.command == "alert-rules":
            outputs = [
                (args.output, render_prometheus_rules(settings)),
                (args.k8s_output, render_prometheus_rule_manifest(settings)),
            ]
            if args.check:
                stale = [o for o, text in outputs if not o.exists() or o.read_text() != text]
                for output in stale:
                    print(f"{output} is stale: run python -m train alert-rules", file=sys.stderr)
                if stale:
                    return 1
                print(" and ".join(str(o) for o, _ in outputs) + " match configs/alerts.yaml")
                return 0
            for output, text in outputs:
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(text)
                print(f"wrote {output}")
            return 0
        now = parse_time(args.now) if args.now else None
        results, read = run_alerts(args.logs, args.predictions, args.reference, now, settings)
    except (SettingsError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(read)
    for result in results:
        print(result.line())
    return 1 if any(r.firing for r in results) else 0


def interrupted_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """What to do after Ctrl-C, for the command that was stopped."""
    if args.command == "fit":
        config = ["--config", str(args.config)] if args.config is not None else []
        # --resume last: it takes an optional value, so an override after it would be read as one.
        again = ["python", "-m", "train", "fit", *config, *args.overrides, "--resume"]
        return f"resume with: {shlex.join(again)}"
    if args.command == "sweep":
        return "trials that finished are in MLflow; python -m train sweep starts a new sweep"
    return f"run it again: {shlex.join(['python', '-m', 'train', *argv])}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit status (130 after Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in MONITORING_COMMANDS and args.config is not None:
        parser.error(f"{args.command} reads --alerts-config, not --config")
    try:
        if args.command in MONITORING_COMMANDS:
            return _monitoring(args)
        return _training(args)
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted_hint(args, argv)}", file=sys.stderr)
        return 130


def _training(args: argparse.Namespace) -> int:
    """The commands that read the training settings; known failures → one error line, status 2."""
    from train.config import ConfigError, load_settings

    known_errors: tuple[type[BaseException], ...] = (ConfigError,)
    try:
        from train.data import DataError
        from train.engine import CheckpointError
        from train.models import ModelError
        from train.registry import PromotionError
        from train.tracking import TrackingError

        known_errors = (
            ConfigError,
            DataError,
            CheckpointError,
            ModelError,
            PromotionError,
            TrackingError,
        )
        settings = load_settings(args.config, args.overrides)
        champion = (
            f"models:/{settings.tracking.registered_model_name}@{settings.registry.champion_alias}"
        )
        if args.command == "data":
            from train.data import format_findings
            from train.pipeline import run_data

            stats = run_data(settings)
            print(
                f"{sum(stats['sizes'].values())} images, {len(stats['classes'])} classes; statistics in {settings.data.stats_path}"
            )
            print(format_findings(stats["findings"]))
        elif args.command == "fit":
            from train.distributed import launch_context
            from train.pipeline import latest_checkpoint, run_fit

            resume = None
            if args.resume is not None:
                resume = (
                    latest_checkpoint(settings) if args.resume == "latest" else Path(args.resume)
                )
            outcome = run_fit(settings, resume=resume, run_name=args.run_name)
            if not launch_context().is_main:
                return 0  # under torchrun the main process prints the result once
            print(
                f"run {outcome.run_id}: val_accuracy={outcome.val_accuracy:.4f} "
                f"test_accuracy={outcome.test_accuracy:.4f} in {outcome.minutes:.1f} min"
            )
            if settings.tracking.uses_embedded_store():
                # Plain `mlflow ui` opens MLflow's default ./mlflow.db, not this store.
                uri = settings.tracking.embedded_uri()
                print(f"see it: make mlflow, or mlflow ui --backend-store-uri {shlex.quote(uri)}")
        elif args.command == "sweep":
            from train.sweep import run_sweep

            for trial, outcome in run_sweep(settings):
                print(f"{trial}: val_accuracy={outcome.val_accuracy:.4f} run {outcome.run_id}")
        elif args.command == "evaluate":
            from train.pipeline import run_evaluate

            metrics = run_evaluate(settings, args.model_uri or champion)
            print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        elif args.command == "promote":
            from train.registry import promote, promote_version

            promotion = (
                promote(settings)
                if args.version is None
                else promote_version(settings, args.version)
            )
            print(promotion.describe(settings.registry.champion_alias))
        elif args.command == "report":
            from train.report import model_table, update_readme

            table = model_table(settings)
            print(table)
            if update_readme(table):
                print("README.md model table updated")
        elif args.command == "import":
            from train.export import ExportError, import_champion

            known_errors = (*known_errors, ExportError)
            print(f"imported {import_champion(settings, args.model_uri)}")
        elif args.command == "reference":
            from train.export import ExportError, attach_reference

            known_errors = (*known_errors, ExportError)
            print(f"wrote {attach_reference(settings, args.model_tag)}")
    except known_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
