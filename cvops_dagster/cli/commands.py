"""``cvops seed``, ``ui``, ``watch``, ``review``, ``bench`` and ``predict``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cvops_dagster.cli.common import CvopsError, artifact_storage
from cvops_dagster.core import settings
from cvops_dagster.core.instance import ensure_dagster_home


def cmd_seed(args: argparse.Namespace) -> int:
    """The labelled batches, then (unless ``--no-production``) the production stream with its
    delayed labels (none with ``--no-labels``)."""
    from cvops_dagster.ingestion.sample_data import seed_landing

    root = settings.normalize_root(settings.landing_root())
    endpoint = settings.s3_endpoint_url()
    counts = seed_landing(root, endpoint)
    for batch, n in counts.items():
        print(f"seeded {batch}: {n} images")
    if not getattr(args, "no_production", False):
        from cvops_dagster.monitoring.sample_stream import delayed_labels, seed_production

        with_labels = not getattr(args, "no_labels", False)
        for batch, n in seed_production(root, endpoint, labels=with_labels).items():
            labelled = len(delayed_labels(batch)) if with_labels else 0
            print(f"seeded production/{batch}: {n} images, " + (f"{labelled} delayed labels" if labelled else "no labels"))
    print(f"landing zone: {root}")
    return 0


def _workspace_target() -> list[str]:
    """Dagster's workspace options: the project's workspace.yaml, else the module itself."""
    from cvops_dagster.cli.launch import LOCATION_NAME, project_directory

    workspace = os.path.join(project_directory(), "workspace.yaml")
    return ["-w", workspace] if os.path.exists(workspace) else ["-m", LOCATION_NAME]


def _end_stopped_runs(service: str):  # noqa: ANN202 - a callback for run_service
    """What ends the runs a stopped service's workers were executing. The instance is opened
    now, while nothing waits, so the stop itself stays quick."""
    from cvops_dagster.cli.common import instance_only
    from cvops_dagster.cli.runs import end_runs_of_stopped_workers

    instance = instance_only()

    def after_stop(pids: set[int]) -> None:
        for line in end_runs_of_stopped_workers(instance, pids, f"{service} was stopped while this run executed"):
            print(f"cvops: {line}", file=sys.stderr, flush=True)

    return after_stop


def cmd_ui(args: argparse.Namespace) -> int:
    """``dagster dev`` (webserver + daemon) on this instance and workspace, until stopped."""
    from cvops_dagster.cli.services import dagster_command, run_service

    settings.disable_telemetry()
    ensure_dagster_home()
    if (warning := exposure_warning(args.host)) is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops it and everything it started)", flush=True)
    command = dagster_command("dev", *_workspace_target(), "-h", args.host, "-p", str(args.port))
    return run_service(command, "the Dagster UI", after_stop=_end_stopped_runs("cvops ui"))


def cmd_watch(args: argparse.Namespace) -> int:
    """The Dagster daemon alone, headless: sensors, automation and the run queue, until stopped."""
    from cvops_dagster.cli.services import run_service

    settings.disable_telemetry()
    ensure_dagster_home()
    print("Dagster daemon: sensors, automation and the run queue (Ctrl-C or SIGTERM stops it)", flush=True)
    # `python -m dagster._daemon` is what `dagster-daemon` and `dagster dev` run.
    command = [sys.executable, "-m", "dagster._daemon", "run", *_workspace_target()]
    return run_service(command, "the Dagster daemon", after_stop=_end_stopped_runs("cvops watch"))


def cmd_review(args: argparse.Namespace) -> int:
    """The FiftyOne App on the review dataset (or a saved view of it), headless, until Ctrl-C or SIGTERM."""
    from cvops_dagster.review.app import ReviewAppError, check_port_free, serve_app, stop_on_signals
    from cvops_dagster.review.connection import ReviewConnectionError, configure, database_from_env, dataset_name

    try:
        name = dataset_name(settings.review_prefix())
        check_port_free(args.port)  # before FiftyOne's slow start, and again just before the App binds
    except ValueError as exc:
        raise CvopsError(f"${settings.REVIEW_PREFIX_ENV}: {exc}") from exc
    except ReviewAppError as exc:
        raise CvopsError(str(exc)) from exc

    def ready(url: str) -> None:
        print(f"FiftyOne App on {url} (Ctrl-C or SIGTERM stops it)", flush=True)

    # Signals are caught from here on: a Ctrl-C while FiftyOne starts still stops cleanly (exit 0).
    with stop_on_signals() as stop:
        try:
            configure(database_from_env())
            if not args.verbose:  # FiftyOne logs its remote-session (ssh) hints at INFO on stdout
                logging.getLogger("fiftyone").setLevel(logging.WARNING)
            return serve_app(name, args.view, args.port, ready=ready, stop=stop)
        except (ReviewAppError, ReviewConnectionError) as exc:
            raise CvopsError(str(exc)) from exc


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
    elif args.name == "monitoring":
        # The code location first, as for cleaning: the process forking the decode workers is
        # then the size of the Dagster step that predicts.
        import cvops_dagster.definitions  # noqa: F401
        from cvops_dagster.bench.monitoring import bench_monitoring

        given = {"images": args.images, "repeats": args.repeats, "threads": args.threads, "workers": args.workers}
        figures = bench_monitoring(**{k: v for k, v in given.items() if v is not None})
    elif args.name == "drift":
        from cvops_dagster.bench.drift import bench_drift

        given = {"batches": args.batches, "sizes": args.sizes, "threads": args.threads}
        figures = bench_drift(**{k: v for k, v in given.items() if v is not None})
    elif args.name == "review":
        from cvops_dagster.bench.review import bench_review

        if not args.verbose:  # FiftyOne logs each Brain run at INFO, on stdout: set before it is imported
            os.environ.setdefault("FIFTYONE_LOGGING_LEVEL", "WARNING")
        given = {"images": args.images, "repeats": args.repeats}
        figures = bench_review(**{k: v for k, v in given.items() if v is not None})
    elif args.name == "hpo":
        from cvops_dagster.bench.hpo import bench_hpo

        given = {"workers": args.workers, "threads": args.threads}
        figures = bench_hpo(**{k: v for k, v in given.items() if v is not None})
    elif args.name == "scale":
        from cvops_dagster.bench.scale import QUICK, bench_scale

        given = {"sizes": args.scale_sizes, "new": args.scale_new, "base_batch": args.scale_base_batch,
                 "repeats": args.repeats, "workers": args.workers}  # fmt: skip
        figures = bench_scale(**{**(QUICK if args.quick else {}), **{k: v for k, v in given.items() if v is not None}})
    else:
        from cvops_dagster.bench.runtime import benchmark_production_runtime

        try:
            figures = benchmark_production_runtime(artifact_storage())
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
        predictor = open_production_predictor(artifact_storage(), int8=args.int8)
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


def exposure_warning(host: str) -> str | None:
    """A warning when the UI would listen beyond this machine: it has no authentication."""
    import ipaddress

    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to any interface
    return (
        f"cvops: warning: the Dagster UI has no authentication; on {host} anyone who can reach this port can "
        "launch runs and read every artifact path. Keep it on 127.0.0.1 behind an authenticating proxy or SSH tunnel."
    )
