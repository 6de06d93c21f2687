"""Command line: ``python -m train {data,fit,sweep,evaluate,promote,import,...} [--config F] [k=v ...]``.

Only argument handling lives here; each command calls one function of its stage module. Known
failures (config, data, model, tracking, checkpoint, promotion, export) print one ``error:`` line
and exit with status 2 before anything is written.

The monitoring commands ``alerts`` (exit 1 when a rule fires) and ``alert-rules`` read
``configs/alerts.yaml`` and ``configs/serving.yaml`` only, and import neither torch nor MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loguru import logger


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--config", type=Path, default=None, help="preset YAML (e.g. configs/presets/best.yaml)"
        )
        p.add_argument(
            "overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=3"
        )
        return p

    command("data", "load the data set, write and log its statistics")
    fit = command("fit", "train the configured model in an MLflow run")
    fit.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint (file or run folder; default: the latest)",
    )
    fit.add_argument("--run-name", default=None)
    command("sweep", "run the hyper-parameter sweep in configs/sweep.yaml")
    evaluate = command("evaluate", "evaluate a logged or registered model on the test set")
    evaluate.add_argument("--model-uri", default=None, help="default: models:/<name>@champion")
    promote = command("promote", "register the best run and set the champion/challenger aliases")
    promote.add_argument(
        "--version",
        default=None,
        help="point the champion at this registered version instead (e.g. a rollback)",
    )
    command("report", "print the model table (best run per architecture) and update README.md")
    imp = command("import", "export the champion to ONNX and save it in the BentoML store")
    imp.add_argument("--model-uri", default=None, help="default: models:/<name>@champion")
    ref = command("reference", "add the monitoring reference.json to a model in the BentoML store")
    ref.add_argument("--model-tag", default=None, help="default: the served model (serving.yaml)")
    alerts = sub.add_parser(
        "alerts", help="evaluate configs/alerts.yaml over the service logs; exit 1 if one fires"
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
    rules = sub.add_parser("alert-rules", help="write the alert rules as a Prometheus rules file")
    rules.add_argument("--output", type=Path, default=Path("deploy/prometheus/alerts.yml"))
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
    from train.monitoring import parse_time, render_prometheus_rules, run_alerts

    try:
        settings = load_alert_settings(args.alerts_config)
        if args.command == "alert-rules":
            text = render_prometheus_rules(settings)
            output = args.output
            if args.check:
                if not output.exists() or output.read_text() != text:
                    print(f"{output} is stale: run python -m train alert-rules", file=sys.stderr)
                    return 1
                print(f"{output} matches configs/alerts.yaml")
                return 0
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


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    args = _parser().parse_args(argv)
    if args.command in ("alerts", "alert-rules"):
        return _monitoring(args)
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
            from train.pipeline import run_data

            stats = run_data(settings)
            print(
                f"{sum(stats['sizes'].values())} images, {len(stats['classes'])} classes; statistics in {settings.data.stats_path}"
            )
        elif args.command == "fit":
            from train.pipeline import latest_checkpoint, run_fit

            resume = None
            if args.resume is not None:
                resume = (
                    latest_checkpoint(settings) if args.resume == "latest" else Path(args.resume)
                )
            outcome = run_fit(settings, resume=resume, run_name=args.run_name)
            print(
                f"run {outcome.run_id}: val_accuracy={outcome.val_accuracy:.4f} "
                f"test_accuracy={outcome.test_accuracy:.4f} in {outcome.minutes:.1f} min"
            )
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
    except KeyboardInterrupt:
        logger.warning("interrupted; resume with: python -m train fit --resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
