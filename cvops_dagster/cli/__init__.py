"""The ``cvops`` command line: seed, run, status, demo, ui, watch, worker, review, predict, rollback and the benchmarks.

Every command works from any folder of the project: the project is ``$CVOPS_HOME``, else the
nearest folder upwards holding a ``workspace.yaml`` that loads ``cvops_dagster.definitions``; the
Dagster instance (``<project>/.dagster_home``), the landing zone and the artifact root default
to folders of it (see :mod:`cvops_dagster.core.settings`), so what a command materializes shows
in the Dagster UI. This module holds the parser and the entry point; the commands live beside
it (``runs``, ``status``, ``commands``, ``worker``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cvops_dagster.cli.commands import cmd_bench, cmd_predict, cmd_review, cmd_seed, cmd_ui, cmd_watch
from cvops_dagster.cli.demo import cmd_demo
from cvops_dagster.cli.common import CvopsError, apply_overrides, instance_only
from cvops_dagster.cli.runs import cmd_rollback, cmd_run, install_stop_handlers
from cvops_dagster.cli.status import cmd_status, collect_status
from cvops_dagster.cli.worker import cmd_worker
from cvops_dagster.core import settings

__all__ = ["build_parser", "collect_status", "main"]


# Longer than ~80 lines on purpose: one flat, declarative list of every command and option,
# read top to bottom like `cvops --help`; splitting it would scatter the interface.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvops",
        description="CVOps on Dagster: ingest image batches, clean, tune, train, promote and export; predict "
        "production batches, report drift and retrain on it. "
        "Works from any folder of the project: the project is $CVOPS_HOME, else the nearest folder upwards "
        "holding a workspace.yaml that loads cvops_dagster.definitions (outside any project: the current folder). "
        f"Environment (each wins over the project default): {settings.LANDING_ENV} (default <project>/{settings.LANDING_DIR}), "
        f"{settings.ARTIFACT_ROOT_ENV} (default <project>/{settings.ARTIFACT_DIR}), "
        f"{settings.DAGSTER_HOME_ENV} (default <project>/{settings.DAGSTER_HOME_DIR}), {settings.S3_ENDPOINT_ENV}; "
        "a relative path in them is relative to the current folder. "
        f"{settings.RETRAIN_ON_ENV} (new_data,drift | new_data | drift | none) and {settings.RETRAIN_CONFIG_ENV} (a run "
        "config file for drift retraining runs) set the retraining policy.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_landing(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--landing",
            metavar="URI",
            help=f"landing zone folder or s3:// URL (overrides ${settings.LANDING_ENV}; "
            f"default <project>/{settings.LANDING_DIR})",
        )

    def add_artifacts(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--artifacts",
            metavar="URI",
            help=f"artifact root folder or s3:// URL (overrides ${settings.ARTIFACT_ROOT_ENV}; "
            f"default <project>/{settings.ARTIFACT_DIR})",
        )

    def add_roots(p: argparse.ArgumentParser) -> None:
        add_landing(p)
        add_artifacts(p)

    p = sub.add_parser(
        "seed",
        help="write the bundled sample digits into the landing zone: three labelled batches and a production stream",
        description="Three labelled batches (<landing>/<batch>/<label>/<file>), then the production stream "
        "(<landing>/production/prod_001..prod_003: in-distribution, rotated, a new camera) with delayed labels "
        "(labels.csv) for part of it.",
    )
    add_landing(p)
    p.add_argument("--no-production", action="store_true", help="write the labelled batches only, no production stream")
    p.add_argument("--no-labels", action="store_true", help="write the production stream without any labels.csv")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("run", help="materialize the asset graph over every complete batch, with progress")
    add_roots(p)
    p.add_argument("--select", metavar="SELECTION", help='Dagster asset selection, e.g. "raw_images+" (default: everything)')
    p.add_argument(
        "--config",
        metavar="FILE",
        help="Dagster run config (YAML or JSON) for the lifecycle run, e.g. the search budget: "
        "ops: {hpo_study: {config: {n_trials: 4}}, trained_model: {config: {max_epochs: 20}}}",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "status",
        help="latest figures and checks per asset, in lifecycle order, with what to do next",
        description="Read-only: the project's Dagster instance (never created here), the roots in use, then per asset "
        "its key figures, its checks' latest results and, for what is missing or failed, the next step.",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object, one key per asset (its figures and its checks' results)"
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "demo",
        help="the whole loop on the bundled data: seed, first champion, production batches and their drift reports, "
        "delayed labels, one drift retraining, accuracy on held-out drifted images before -> after",
    )
    add_roots(p)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="Dagster run config (YAML or JSON) for the training runs (the first one and the drift retraining), "
        "e.g. ops: {hpo_study: {config: {n_trials: 2}}}",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "ui", help="`dagster dev` on 127.0.0.1 with this workspace (UI + daemon) until Ctrl-C or SIGTERM, which stop all of it within 15 s"
    )
    add_roots(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address the UI listens on (default 127.0.0.1; it has no authentication, so any other address is warned about)",
    )
    p.add_argument("--port", type=int, default=3000, metavar="N", help="port the UI listens on (default 3000)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser(
        "watch",
        help="the Dagster daemon alone, headless (sensors, automation, the run queue) until Ctrl-C or SIGTERM, "
        "which stop all of it within 15 s",
    )
    add_roots(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "worker",
        help="a Celery worker that executes the steps of runs (CVOPS_EXECUTOR=celery), one at a time, "
        "until Ctrl-C or SIGTERM, which stop it within 15 s",
        description="With CVOPS_EXECUTOR=celery, runs send each step to the Celery broker (CVOPS_CELERY_BROKER; results "
        "through CVOPS_CELERY_BACKEND, default the broker); this worker takes steps from it and executes them against "
        "the run's Dagster instance, one at a time in its own process (Celery's solo pool: a step may start processes "
        "of its own, as hpo_study's hpo_workers do). Start one per step to run at once, on any machine with the same "
        "environment as `cvops run` (the instance of deploy/dagster.yaml, an s3:// artifact root, CVOPS_OPTUNA_STORAGE "
        "on a database): nothing is shared through a local folder. A step it was running when stopped fails its run "
        "with the reason.",
    )
    add_roots(p)
    p.add_argument("--name", metavar="NAME", help="the worker's name, NAME@<host> (default cvops-<random>)")
    p.add_argument(
        "--queue",
        action="append",
        metavar="QUEUE",
        help="a queue to take steps from, repeatable (default: dagster, where the executor sends every step "
        "without a dagster-celery/queue tag)",
    )
    p.add_argument("--loglevel", default="INFO", metavar="LEVEL", help="Celery's log level (default INFO: one line per step received and done)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "review",
        help="the FiftyOne App on the review dataset (or one of its saved views) on 127.0.0.1, headless, "
        "until Ctrl-C or SIGTERM",
        description=f"Serves the FiftyOne App on 127.0.0.1 (never opens a browser) on the review dataset "
        f"<prefix>_review (prefix: ${settings.REVIEW_PREFIX_ENV}, default {settings.DEFAULT_REVIEW_PREFIX}) and prints "
        f"its URL. FiftyOne's database: ${settings.FIFTYONE_URI_ENV}, else the bundled mongod "
        f"(data in ${settings.FIFTYONE_DIR_ENV}, default FiftyOne's own folder).",
    )
    p.add_argument("--view", metavar="NAME", help="open on this saved view of the dataset, e.g. edge_cases (default: the whole dataset)")
    p.add_argument("--port", type=int, default=5151, metavar="N", help="port the App listens on (default 5151)")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("bench", help="benchmarks, ratios measured side by side in one run")
    add_artifacts(p)
    p.add_argument(
        "name",
        choices=["cleaning", "training", "runtime", "monitoring", "drift", "review", "hpo", "scale"],
        help="cleaning, training, monitoring, drift, review, hpo and scale: on data generated in a temporary folder (monitoring and "
        "drift train a small model on the bundled digits first; review writes FiftyOne datasets, in a temporary "
        "database unless one is in use, and deletes them; hpo runs a 16-trial study with 1 and 2 workers on colour "
        "photo patches; scale adds one batch to datasets of growing size); runtime: the production runtime under the artifact root",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object of the measured figures")
    p.add_argument("--repeats", type=int, help="cleaning: timed repeats, the best is kept (default 3); monitoring: the same (default 2); review: the same (default 3); scale: adds per size (default 3)")
    p.add_argument("--quick", action="store_true", help="cleaning: a small run (200 digits; 660 photos: 300 large, 600 + 60 incremental; 1 repeat); scale: 60 images added to 300 and 1,200")
    p.add_argument("--sets", type=lambda v: tuple(v.split(",")), help="cleaning: some of sample,tenx,large,incremental")
    p.add_argument("--digits", type=int, help="cleaning: digits in the sample and tenx sets (default all 1,797)")
    p.add_argument("--large-count", type=int, help="cleaning: photos in the large set (default 2,000)")
    p.add_argument("--incremental-base", type=int, help="cleaning: photos already cleaned (default 6,000)")
    p.add_argument("--incremental-new", type=int, help="cleaning: photos in the new batch (default 600)")
    p.add_argument(
        "--scale-sizes", type=lambda v: tuple(int(n) for n in v.split(",")),
        help="scale: dataset sizes the batch is added to, comma-separated (default 6000,60000,120000)",
    )  # fmt: skip
    p.add_argument("--scale-new", type=int, help="scale: images in the added batch (default 600)")
    p.add_argument("--scale-base-batch", type=int, help="scale: images per batch of the base datasets (default 6,000)")
    p.add_argument(
        "--allow-synthetic",
        action="store_true",
        help="runtime: without a production model, time a generated model of the default architecture",
    )
    p.add_argument("--images", type=int, help="monitoring: PNG files in the production batch; review: production images in the review dataset (default 5,000)")
    p.add_argument("--workers", type=int, help="monitoring and scale: decode worker processes (default: the available cores); hpo: worker processes of the parallel study (default 2)")
    p.add_argument("--batches", type=int, help="drift: resampled batches per condition and size (default 100)")
    p.add_argument(
        "--sizes", type=lambda v: tuple(int(n) for n in v.split(",")), help="drift: batch sizes, comma-separated (default 100,500)"
    )
    p.add_argument("--threads", type=int, help="monitoring and drift: ONNX Runtime and torch threads; hpo: torch threads of a study, split among its workers (default: the available cores)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "predict",
        help="label and confidence per image, with the production ONNX runtime",
        description="Label and confidence per image file, with the runtime production/serving.json pins. "
        "A folder contributes every image file below it, recursively (suffixes .png .jpg .jpeg .webp "
        ".bmp .tif .tiff .gif and their variants; hidden files and folders skipped), in sorted order. "
        "Every bad path (missing, not a file, unreadable, not a decodable image, a folder without "
        "images) is reported on stderr with its reason while the others are still predicted; "
        "the exit status is then 1.",
    )
    add_artifacts(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders of them")
    p.add_argument("--int8", action="store_true", help="use the INT8 runtime (when it was accepted)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON list, a record per file in order: path, label, confidence, error (null on success)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "rollback",
        help="restore the previous production model and serve its runtime (the rollback_job)",
        description="Run the rollback_job: production_model decides to restore the previous champion, "
        "onnx_runtime publishes it with that model's runtime, reused when its files still verify, else rebuilt.",
    )
    add_artifacts(p)
    p.add_argument(
        "--no-export", action="store_true", help="serve the runtime already built for the restored model; fail if there is none"
    )
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose and args.command in ("run", "demo", "bench"):
        _quiet_libraries(trains=args.command != "bench" or args.name not in ("cleaning", "review", "scale"))
    try:
        args.roots = apply_overrides(args)  # resolved once, before the environment is exported
        if args.command in ("run", "demo", "rollback"):
            install_stop_handlers(instance_only)
        return int(args.func(args) or 0)
    except CvopsError as exc:
        print(f"cvops: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cvops: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for users; -v shows the traceback
        if args.verbose:
            raise
        print(f"cvops: error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        return 1


def _quiet_libraries(trains: bool) -> None:
    """Library chatter (Lightning tips, GX temp folders, Optuna trial lines) off the terminal.

    Lightning and Optuna log through handlers of their own, set up when they are imported,
    so they are imported here to be quieted, only for commands that train (``trains``): a
    command that never does (``bench cleaning``) keeps torch out of its process.
    """
    if trains:
        import lightning.pytorch  # noqa: F401 - it sets its loggers to INFO on import; override after
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "great_expectations", "optuna", "py.warnings"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if trains:
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
        except ImportError:  # pragma: no cover - optuna is a dependency
            pass
