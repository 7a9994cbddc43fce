"""The ``cvops`` command line: seed, run, status, demo, ui and the benchmarks.

Every command runs against the configured Dagster instance (``$DAGSTER_HOME``, default
``./.dagster_home``), so what it materializes shows in the Dagster UI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from cvops_dagster.core import settings
from cvops_dagster.core.instance import ensure_dagster_home

logger = logging.getLogger("cvops")

PROGRESS_EVENTS = ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION")


class CvopsError(Exception):
    """A failure to report to the user in one clear line (exit code 1)."""


def _apply_overrides(args: argparse.Namespace) -> None:
    """``--landing``/``--artifacts`` win over the environment for this process and its children."""
    if getattr(args, "landing", None):
        os.environ[settings.LANDING_ENV] = args.landing
    if getattr(args, "artifacts", None):
        os.environ[settings.ARTIFACT_ROOT_ENV] = args.artifacts


def _load() -> tuple[Any, Any]:
    """The Dagster instance and definitions, loaded after the environment is final."""
    settings.disable_telemetry()
    ensure_dagster_home()
    from dagster import DagsterInstance

    from cvops_dagster.definitions import defs

    return DagsterInstance.get(), defs


def _landing():  # noqa: ANN202 - LandingZone, imported lazily
    from cvops_dagster.ingestion.landing import LandingZone

    return LandingZone(settings.normalize_root(settings.landing_root()), settings.s3_endpoint_url())


# --------------------------------------------------------------------------- seed


def cmd_seed(args: argparse.Namespace) -> int:
    from cvops_dagster.ingestion.sample_data import seed_landing

    root = settings.normalize_root(settings.landing_root())
    counts = seed_landing(root, settings.s3_endpoint_url())
    for batch, n in counts.items():
        print(f"seeded {batch}: {n} images")
    print(f"landing zone: {root}")
    return 0


# --------------------------------------------------------------------------- run


class _Progress:
    """Prints a run's step and materialization events as they land in the instance."""

    def __init__(self, instance: Any, label: str) -> None:
        import uuid

        self.instance = instance
        self.label = label
        #: Tagged onto the run this display follows, so runs the daemon starts meanwhile are not shown.
        self.tags = {"cvops/invocation": uuid.uuid4().hex}
        self.started = time.time()
        self._stop = threading.Event()
        self._cursor: str | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Progress:
        print(f"▶ {self.label}", flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - progress display must never break a run
                logger.debug("progress poll failed", exc_info=True)

    def _poll(self) -> None:
        with self._lock:
            self._poll_once()

    def _poll_once(self) -> None:
        from dagster import DagsterEventType, RunsFilter

        runs = self.instance.get_runs(RunsFilter(tags=self.tags), limit=1)
        if not runs:
            return
        types = {getattr(DagsterEventType, name) for name in PROGRESS_EVENTS}
        connection = self.instance.get_records_for_run(runs[0].run_id, cursor=self._cursor, of_type=types)
        self._cursor = connection.cursor
        for record in connection.records:
            self._print(record.event_log_entry)

    def _print(self, record: Any) -> None:
        event = record.dagster_event
        elapsed = time.time() - self.started
        name = event.event_type_value
        if name == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            part = f" [{mat.partition}]" if mat.partition else ""
            print(f"  {elapsed:6.1f}s  materialized {mat.asset_key.to_user_string()}{part}", flush=True)
        elif name == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            print(f"  {elapsed:6.1f}s  check {ev.check_name}: {'passed' if ev.passed else 'FAILED'}", flush=True)
        elif name == "STEP_FAILURE":
            message = _root_cause(event.event_specific_data.error)
            print(f"  {elapsed:6.1f}s  FAILED {event.step_key}: {message}", flush=True)
        elif name == "STEP_START":
            print(f"  {elapsed:6.1f}s  started {event.step_key}", flush=True)


# Progress comes from _Progress; failures are summarised by _root_cause and the full
# traceback stays in the run's event log (cvops ui).
_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def _root_cause(error: Any) -> str:
    """The innermost error of a step failure, in one line."""
    if error is None:
        return "unknown error"
    while error.cause is not None:
        error = error.cause
    lines = [line for line in error.message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error.cls_name or "unknown error"


def _failure_message(result: Any) -> str:
    failures = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            failures.append(f"{event.step_key}: {_root_cause(event.event_specific_data.error)}")
    return "; ".join(failures) or "run failed"


def run_lifecycle(select: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Materialize the graph (or a selection) over every complete batch, in process.

    Raw batches run one ``ingest_job`` partition run each; everything downstream runs in one
    ``lifecycle_job`` run, so a blocking check failure stops the assets after it.
    """
    instance, defs = _load()
    from dagster import AssetKey, AssetSelection

    graph = defs.resolve_asset_graph()
    try:
        selection = AssetSelection.from_string(select) if select else AssetSelection.all()
        keys = selection.resolve(graph)
    except Exception as exc:  # noqa: BLE001 - Dagster raises several types for a bad selection
        raise CvopsError(f"invalid selection {select!r}: {str(exc).splitlines()[0]}") from exc
    if not keys:
        raise CvopsError(f"selection {select!r} matches no asset")
    raw_key = AssetKey("raw_images")
    summary: dict[str, Any] = {"runs": []}

    if raw_key in keys:
        batches = _landing().list_complete_batches()
        if not batches:
            raise CvopsError(
                f"no complete batch in the landing zone {settings.landing_root()!r} "
                "(a batch is <landing>/<batch_id>/<label>/<file> plus a _READY file; try `cvops seed`)"
            )
        from assets.partitions import image_batches

        known = set(instance.get_dynamic_partitions(image_batches.name))
        instance.add_dynamic_partitions(image_batches.name, [b for b in batches if b not in known])
        job = defs.resolve_job_def("ingest_job")
        for i, batch in enumerate(batches, 1):
            with _Progress(instance, f"[{i}/{len(batches)}] raw_images partition {batch}") as progress:
                result = job.execute_in_process(
                    instance=instance, partition_key=batch, run_config=_QUIET_LOGS, raise_on_error=False, tags=progress.tags
                )
            summary["runs"].append(result.run_id)
            if not result.success:
                raise CvopsError(f"ingesting batch {batch} failed: {_failure_message(result)} (run {result.run_id})")

    rest = [k for k in keys if k != raw_key]
    if rest:
        job = defs.resolve_job_def("lifecycle_job")
        names = ", ".join(sorted(k.to_user_string() for k in rest))
        with _Progress(instance, f"lifecycle run: {names}") as progress:
            result = job.execute_in_process(
                instance=instance, asset_selection=rest, run_config=_QUIET_LOGS, raise_on_error=False, tags=progress.tags
            )
        summary["runs"].append(result.run_id)
        if not result.success:
            raise CvopsError(
                f"lifecycle run failed: {_failure_message(result)} (run {result.run_id}; `cvops ui` shows its full log)"
            )
    return summary


def cmd_run(args: argparse.Namespace) -> int:
    started = time.time()
    summary = run_lifecycle(args.select)
    print(f"done in {time.time() - started:.1f}s ({len(summary['runs'])} runs); see `cvops status`")
    return 0


# --------------------------------------------------------------------------- status


def _metadata_to_json(metadata: dict[str, Any]) -> dict[str, Any]:
    """Plain figures from materialization metadata; plots and tables stay in the UI."""
    from dagster import JsonMetadataValue, MarkdownMetadataValue, PathMetadataValue, TableMetadataValue

    out: dict[str, Any] = {}
    for name, value in metadata.items():
        if isinstance(value, (MarkdownMetadataValue, TableMetadataValue)):
            continue
        if isinstance(value, JsonMetadataValue):
            out[name] = value.data
        elif isinstance(value, PathMetadataValue):
            out[name] = str(value.path)
        elif hasattr(value, "value"):
            v = value.value
            if isinstance(v, (str, int, float, bool, list, dict)) or v is None:
                out[name] = v
    return out


def collect_status(instance: Any, defs: Any) -> dict[str, Any]:
    """The latest figures per asset, as ``cvops status --json`` prints them."""
    from dagster import AssetKey, AssetRecordsFilter

    status: dict[str, Any] = {}
    for key in sorted(defs.resolve_asset_graph().get_all_asset_keys(), key=lambda k: k.to_user_string()):
        name = key.to_user_string()
        if key == AssetKey("raw_images"):
            status[name] = _raw_images_status(instance, key, AssetRecordsFilter)
            continue
        event = instance.get_latest_materialization_event(key)
        if event is None:
            status[name] = None
            continue
        figures = _metadata_to_json(dict(event.asset_materialization.metadata))
        figures["materialized_at"] = datetime.fromtimestamp(event.timestamp, UTC).isoformat(timespec="seconds")
        status[name] = figures
    return status


def _raw_images_status(instance: Any, key: Any, records_filter: Any) -> dict[str, Any] | None:
    partitions = sorted(instance.get_materialized_partitions(key))
    if not partitions:
        return None
    per_batch: dict[str, Any] = {}
    reasons: dict[str, int] = {}
    for partition in partitions:
        result = instance.fetch_materializations(records_filter(asset_key=key, asset_partitions=[partition]), limit=1)
        if not result.records:
            continue
        figures = _metadata_to_json(dict(result.records[0].asset_materialization.metadata))
        per_batch[partition] = {k: figures.get(k) for k in ("files", "rejected", "bytes")}
        for reason, n in (figures.get("rejected_reasons") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    return {
        "batches": len(per_batch),
        "files": sum(int(b["files"] or 0) for b in per_batch.values()),
        "bytes": sum(int(b["bytes"] or 0) for b in per_batch.values()),
        "rejected": sum(int(b["rejected"] or 0) for b in per_batch.values()),
        "rejected_reasons": dict(sorted(reasons.items())),
        "per_batch": per_batch,
    }


def cmd_status(args: argparse.Namespace) -> int:
    instance, defs = _load()
    status = collect_status(instance, defs)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return 0
    for name, figures in status.items():
        if figures is None:
            print(f"{name}: not materialized")
            continue
        shown = {k: v for k, v in figures.items() if not isinstance(v, (dict, list))}
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


# --------------------------------------------------------------------------- demo, ui


def cmd_demo(args: argparse.Namespace) -> int:
    if not _landing().list_complete_batches():
        cmd_seed(args)
    else:
        print(f"landing zone {settings.landing_root()} already holds complete batches; not seeding")
    cmd_run(argparse.Namespace(select=None))
    home = os.environ[settings.DAGSTER_HOME_ENV]
    print()
    print(f"artifacts:        {settings.normalize_root(settings.artifact_root())}")
    print(f"dagster instance: {home}")
    print("figures:          cvops status --json")
    print("UI:               cvops ui   (then open http://127.0.0.1:3000)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    settings.disable_telemetry()
    ensure_dagster_home()
    dagster = shutil.which("dagster", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if dagster is None:
        raise CvopsError("the `dagster` command is not installed in this environment")
    target = ["-w", "workspace.yaml"] if os.path.exists("workspace.yaml") else ["-m", "cvops_dagster.definitions"]
    command = [dagster, "dev", *target, "-h", args.host, "-p", str(args.port)]
    print(" ".join(command), flush=True)
    return subprocess.call(command)


# --------------------------------------------------------------------------- bench, predict, rollback


def _storage():  # noqa: ANN202 - ArtifactStorage, imported lazily
    from cvops_dagster.core.storage import ArtifactStorage

    return ArtifactStorage(settings.normalize_root(settings.artifact_root()), endpoint_url=settings.s3_endpoint_url())


def cmd_bench(args: argparse.Namespace) -> int:
    settings.disable_telemetry()
    if args.name == "cleaning":
        # The code location first: the timed process is then the size of the Dagster step
        # that cleans (forking the decode workers costs more from a larger process).
        import cvops_dagster.definitions  # noqa: F401
        from cvops_dagster.bench.cleaning import QUICK, run_cleaning_benchmark

        given = {"digits": args.digits, "large_count": args.large_count, "incremental_base": args.incremental_base,
                 "incremental_new": args.incremental_new, "repeats": args.repeats, "sets": args.sets}  # fmt: skip
        figures = run_cleaning_benchmark(**{**(QUICK if args.quick else {}), **{k: v for k, v in given.items() if v is not None}})
    elif args.name == "training":
        from cvops_dagster.bench.training import run_training_benchmark

        figures = run_training_benchmark()
    else:
        from cvops_dagster.bench.runtime import benchmark_production_runtime

        try:
            figures = benchmark_production_runtime(_storage())
        except FileNotFoundError as exc:
            if not args.allow_synthetic:
                raise CvopsError(f"{exc}; or pass --allow-synthetic to time a generated model of the default architecture") from exc
            from cvops_dagster.bench.runtime import run_default_runtime_benchmark

            figures = {"model_id": None, **run_default_runtime_benchmark()}
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True, default=str))
    else:
        for name, value in figures.items():
            print(f"{name:45s} {value:.4g}" if isinstance(value, float) else f"{name:45s} {value}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # Serving modules only: this path must load neither torch nor Dagster (tests/test_cli.py).
    from cvops_dagster.registry.history import ProductionStateError
    from cvops_dagster.serving.file_predictions import predict_paths
    from cvops_dagster.serving.pointer import open_production_predictor
    from cvops_dagster.serving.runtime_file import RuntimeModelError

    try:
        # Pinned by hash, cross-checked against the production history and the champion.
        predictor = open_production_predictor(_storage(), int8=args.int8)
        records = predict_paths(predictor, args.paths)
    except (FileNotFoundError, ProductionStateError, RuntimeModelError) as exc:
        raise CvopsError(str(exc)) from exc
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    for r in records:
        if r.error is not None:
            print(f"cvops: {r.path}: {r.error}", file=sys.stderr)
        elif not args.json:
            print(f"{r.path}\t{r.label}\t{r.confidence:.4f}")
    bad = sum(r.error is not None for r in records)
    if bad:
        raise CvopsError(f"{bad} of {len(records)} paths could not be predicted")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Run ``rollback_job`` in process: production_model decides to restore the previous champion,
    onnx_runtime publishes it with that model's runtime (reused when it still verifies)."""
    instance, defs = _load()
    run_config = {
        **_QUIET_LOGS,
        "ops": {
            "production_model": {"config": {"rollback": True}},
            "onnx_runtime": {"config": {"reuse_only": bool(args.no_export)}},
        },
    }
    with _Progress(instance, "rollback: production_model, onnx_runtime") as progress:
        result = defs.resolve_job_def("rollback_job").execute_in_process(
            instance=instance, run_config=run_config, raise_on_error=False, tags=progress.tags
        )
    if not result.success:
        raise CvopsError(f"rollback failed: {_failure_message(result)} (run {result.run_id})")
    from cvops_dagster.registry.history import replay_history

    champion = replay_history(_storage()).champion
    assert champion is not None and champion.runtime is not None  # the job just published it
    print(
        f"production model is now {champion.model_id} (rolled back from {champion.previous_model_id}; "
        f"test accuracy {champion.metrics.get('accuracy')}); serving {champion.runtime['fp32_key']}"
    )
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvops",
        description="CVOps on Dagster: ingest image batches, clean, tune, train, promote and export. "
        f"Environment: {settings.LANDING_ENV} (default {settings.DEFAULT_LANDING}), "
        f"{settings.ARTIFACT_ROOT_ENV} (default {settings.DEFAULT_ARTIFACT_ROOT}), "
        f"{settings.S3_ENDPOINT_ENV}, {settings.DAGSTER_HOME_ENV} (default {settings.DEFAULT_DAGSTER_HOME}).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_roots(p: argparse.ArgumentParser) -> None:
        p.add_argument("--landing", metavar="URI", help=f"landing zone folder or s3:// URL (overrides ${settings.LANDING_ENV})")
        p.add_argument("--artifacts", metavar="URI", help=f"artifact root folder or s3:// URL (overrides ${settings.ARTIFACT_ROOT_ENV})")

    p = sub.add_parser("seed", help="write the bundled sample digits into the landing zone as three batches")
    add_roots(p)
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("run", help="materialize the asset graph over every complete batch, in process")
    add_roots(p)
    p.add_argument("--select", metavar="SELECTION", help='Dagster asset selection, e.g. "raw_images+" (default: everything)')
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="latest figures per asset (from the Dagster instance in $DAGSTER_HOME)")
    p.add_argument("--json", action="store_true", help="print one JSON object, one key per asset")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="seed (if the landing zone is empty) + run + where to look")
    add_roots(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ui", help="`dagster dev` on 127.0.0.1 with this workspace")
    add_roots(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("bench", help="benchmarks, ratios measured side by side in one run")
    add_roots(p)
    p.add_argument("name", choices=["cleaning", "training", "runtime"])
    p.add_argument("--json", action="store_true", help="print one JSON object of the measured figures")
    p.add_argument("--repeats", type=int, help="cleaning: timed repeats, the best is kept (default 3)")
    p.add_argument("--quick", action="store_true", help="cleaning: a small run (200 digits; 660 photos: 300 large, 600 + 60 incremental; 1 repeat)")
    p.add_argument("--sets", type=lambda v: tuple(v.split(",")), help="cleaning: some of sample,tenx,large,incremental")
    p.add_argument("--digits", type=int, help="cleaning: digits in the sample and tenx sets (default all 1,797)")
    p.add_argument("--large-count", type=int, help="cleaning: photos in the large set (default 2,000)")
    p.add_argument("--incremental-base", type=int, help="cleaning: photos already cleaned (default 6,000)")
    p.add_argument("--incremental-new", type=int, help="cleaning: photos in the new batch (default 600)")
    p.add_argument(
        "--allow-synthetic",
        action="store_true",
        help="runtime: without a production model, time a generated model of the default architecture",
    )
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
    add_roots(p)
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
        description="Run the rollback_job in process: production_model decides to restore the previous champion, "
        "onnx_runtime publishes it with that model's runtime, reused when its files still verify, else rebuilt.",
    )
    add_roots(p)
    p.add_argument(
        "--no-export", action="store_true", help="serve the runtime already built for the restored model; fail if there is none"
    )
    p.set_defaults(func=cmd_rollback)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose and args.command in ("run", "demo", "bench"):
        _quiet_libraries(trains=args.command != "bench" or args.name != "cleaning")
    _apply_overrides(args)
    try:
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


if __name__ == "__main__":
    sys.exit(main())
