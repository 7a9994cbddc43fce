"""``cvops seed``, ``demo``, ``ui``, ``bench`` and ``predict``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from cvops_dagster.cli.common import CvopsError, artifact_storage, landing_zone
from cvops_dagster.cli.runs import cmd_run
from cvops_dagster.core import settings
from cvops_dagster.core.instance import ensure_dagster_home


def cmd_seed(args: argparse.Namespace) -> int:
    from cvops_dagster.ingestion.sample_data import seed_landing

    root = settings.normalize_root(settings.landing_root())
    counts = seed_landing(root, settings.s3_endpoint_url())
    for batch, n in counts.items():
        print(f"seeded {batch}: {n} images")
    print(f"landing zone: {root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not landing_zone().list_complete_batches():
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
    if (warning := exposure_warning(args.host)) is not None:
        print(warning, file=sys.stderr, flush=True)
    print(" ".join(command), flush=True)
    return subprocess.call(command)


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
