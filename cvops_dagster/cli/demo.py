"""``cvops demo``: the whole loop on the bundled data, through the code the daemon runs.

1. Seed the labelled batches and the production stream, without its delayed labels.
2. Train and serve a first champion (``cvops run`` over the labelled batches).
3. Tick ``production_batches_sensor``: one production run per batch (predictions, drift).
4. Tick ``drift_retrain_sensor``: drift found, but no labels yet, so retraining waits.
5. Deliver the delayed labels; tick the production sensor (labels runs: realised accuracy,
   review feedback) and the drift sensor again: one retraining run is requested and run.
6. Measure the accuracy on held-out drifted images (never in the landing zone) of the champion
   before and after.

The sensors are evaluated in this process with their own code (``build_sensor_context``), and
their run requests are created through the code location like any run (queued for a daemon when
one serves the instance), with the tags the daemon would give them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from cvops_dagster.cli.common import CvopsError, artifact_storage, landing_zone
from cvops_dagster.core import settings


def tick_sensor(launcher: Any, queued: bool, sensor_name: str, cursor: str | None) -> tuple[str | None, list[Any], str | None]:  # noqa: ANN401
    """Evaluate one sensor of the code location here, apply its partition requests and launch
    its run requests; returns (new cursor, finished runs, skip reason)."""
    from dagster import DagsterRunStatus, build_sensor_context

    from cvops_dagster.cli.runs import _failure_message, _launch
    from cvops_dagster.definitions import defs

    instance = launcher.instance
    sensor = defs.resolve_sensor_def(sensor_name)
    resources = {name: value for name, value in defs.resources.items()}  # type: ignore[union-attr]
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources, definitions=defs, sensor_name=sensor_name) as context:
        result = sensor(context)
    for request in getattr(result, "dynamic_partitions_requests", None) or []:
        known = set(instance.get_dynamic_partitions(request.partitions_def_name))
        instance.add_dynamic_partitions(request.partitions_def_name, [k for k in request.partition_keys if k not in known])
    runs = []
    for request in getattr(result, "run_requests", None) or []:
        job = request.job_name or sensor.job_name
        tags = {**request.tags, "dagster/run_key": request.run_key or "", "dagster/sensor_name": sensor_name}
        label = f"{sensor_name} -> {job}" + (f" [{request.partition_key}]" if request.partition_key else "")
        selection = set(request.asset_selection) if request.asset_selection else None
        run = _launch(
            launcher, queued, label, job, dict(request.run_config or {}), extra_tags=tags,
            partition_key=request.partition_key, asset_selection=selection,
        )  # fmt: skip
        if run.status != DagsterRunStatus.SUCCESS:
            message = _failure_message(instance, run.run_id)
            if job != "lifecycle_job" or "check_" not in message:
                raise CvopsError(f"{label} failed: {message} (run {run.run_id})")
            # A retraining whose challenger a blocking check refused: the champion keeps serving.
            print(f"  the retraining's challenger was refused ({message}); the champion keeps serving", flush=True)
        runs.append(run)
    skip = getattr(result, "skip_reason", None)
    return result.cursor, runs, getattr(skip, "skip_message", None) if skip is not None else None


def _drift_lines(instance: Any) -> list[str]:  # noqa: ANN401
    from sensors.retraining import drift_events

    lines = []
    for event in drift_events(instance):
        verdict = {True: "DRIFT", False: "no drift", None: "too few images"}[event.drift]
        lines.append(f"  {event.batch_id}: {verdict} (score {event.score}, threshold {event.threshold})")
    return lines


def _holdout_accuracy(storage: Any, model_id: str) -> float:  # noqa: ANN401
    """Accuracy of ``model_id``'s published runtime on the held-out drifted images."""
    from cvops_dagster.monitoring.sample_stream import drifted_holdout
    from cvops_dagster.registry.history import replay_history
    from cvops_dagster.serving.pointer import local_copy
    from cvops_dagster.serving.predictor import Predictor

    event = replay_history(storage).published_event(model_id)
    if event is None:
        raise CvopsError(f"model {model_id} has no published runtime")
    runtime = event["runtime"]
    images, labels = drifted_holdout()
    with local_copy(storage, runtime["fp32_key"]) as path:
        predictor = Predictor(path, expected_sha256=runtime["fp32_sha256"], published=True)
        predicted = predictor.predict(images).labels
    return float(sum(p == str(t) for p, t in zip(predicted, labels, strict=True)) / len(labels))


def run_demo(run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's loop (see the module docstring); returns what it measured."""
    from cvops_dagster.cli.common import load_instance
    from cvops_dagster.cli.launch import CodeLocationLauncher, daemon_serves_queue
    from cvops_dagster.cli.runs import run_lifecycle
    from cvops_dagster.monitoring.sample_stream import STREAM_BATCHES, delayed_labels, seed_production, write_delayed_labels
    from cvops_dagster.serving.pointer import read_pointer

    root = settings.normalize_root(settings.landing_root())
    endpoint = settings.s3_endpoint_url()
    landing = landing_zone()
    if not landing.list_complete_batches():
        from cvops_dagster.ingestion.sample_data import seed_landing

        for batch, n in seed_landing(root, endpoint).items():
            print(f"seeded {batch}: {n} images")
    if not landing.list_complete_batches(production=True):
        for batch, n in seed_production(root, endpoint, labels=False).items():
            print(f"seeded production/{batch}: {n} images (labels arrive later)")

    print("\n1. the first champion, from the labelled batches")
    run_lifecycle(production=False, run_config=run_config)
    storage = artifact_storage()
    pointer = read_pointer(storage)
    assert pointer is not None  # the lifecycle run published it
    before = pointer.model_id

    instance, _ = load_instance()
    with CodeLocationLauncher.open(instance) as launcher:
        queued = daemon_serves_queue(instance)
        print("\n2. production batches arrive: production_batches_sensor")
        production_cursor, _, _ = tick_sensor(launcher, queued, "production_batches_sensor", None)
        print("drift reports:")
        print("\n".join(_drift_lines(instance)))
        print(_review_line(instance))
        print("\n3. drift_retrain_sensor, before any label")
        drift_cursor, runs, reason = tick_sensor(launcher, queued, "drift_retrain_sensor", None)
        print(f"  {reason or 'requested ' + str(len(runs)) + ' run(s)'}")

        print("\n4. delayed labels arrive")
        for batch in STREAM_BATCHES:
            labels = delayed_labels(batch)
            if labels:
                write_delayed_labels(root, batch, labels, endpoint)
                print(f"  delivered {len(labels)} labels for production/{batch}")
        production_cursor, _, _ = tick_sensor(launcher, queued, "production_batches_sensor", production_cursor)
        print("\n5. drift_retrain_sensor, with labels")
        drift_cursor, runs, reason = tick_sensor(launcher, queued, "drift_retrain_sensor", drift_cursor)
        if reason:
            print(f"  {reason}")
        for run in runs:
            print(f"  retraining run {run.run_id} (requested for drift on {run.tags.get('cvops/drift_batch')})")
    after_pointer = read_pointer(storage)
    after = after_pointer.model_id if after_pointer is not None else before
    accuracy_before = _holdout_accuracy(storage, before)
    accuracy_after = _holdout_accuracy(storage, after)
    print("\n6. accuracy on held-out drifted images (new camera; never in the landing zone)")
    print(f"  before: {accuracy_before:.3f} (model {before})")
    print(f"  after:  {accuracy_after:.3f} (model {after}{', new champion' if after != before else ', champion kept'})")
    return {"before": before, "after": after, "accuracy_before": accuracy_before, "accuracy_after": accuracy_after,
            "retraining_runs": len(runs)}  # fmt: skip


def _review_line(instance) -> str:  # noqa: ANN001 - a DagsterInstance
    """The review dataset edge_case_review built: its samples and saved views."""
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey("edge_case_review"))
    if event is None:
        return "review dataset: not built"
    meta = {name: value.value for name, value in event.asset_materialization.metadata.items()}
    views = ", ".join(f"{name} {count}" for name, count in (meta.get("view_counts") or {}).items())
    return f"review dataset {meta.get('dataset')}: {meta.get('samples')} samples; saved views: {views}"


def cmd_demo(args: argparse.Namespace) -> int:
    from cvops_dagster.cli.runs import read_run_config

    config_path = getattr(args, "config", None)
    if config_path and not settings.retrain_run_config_path():
        # The drift retraining the sensor requests gets the same budget as the first run.
        os.environ[settings.RETRAIN_CONFIG_ENV] = os.path.abspath(config_path)
    run_demo(read_run_config(config_path))
    home = os.environ[settings.DAGSTER_HOME_ENV]
    print()
    print(f"artifacts:        {settings.normalize_root(settings.artifact_root())}")
    print(f"dagster instance: {home}")
    print("figures:          cvops status --json")
    print("UI:               cvops ui   (then open http://127.0.0.1:3000)")
    print("edge cases:       cvops review --view edge_cases   (FiftyOne App; drifted batches: --view drift_<batch>)")
    return 0
