"""production_batches_sensor and drift_retrain_sensor through build_sensor_context: run requests,
partitions and cursor; exactly once per batch state, labels state and drift event."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    DagsterRunStatus,
    SensorResult,
    build_sensor_context,
    instance_for_test,
)
from dagster._core.test_utils import create_run_for_test

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.serving.pointer import SERVING_KEY, ServingPointer
from resources.storage import ArtifactStore, ImageSource
from sensors.production import LABELS_ASSETS, PRODUCTION_BATCH_TAG, production_batches_sensor
from sensors.production import TRIGGER_TAG as PRODUCTION_TRIGGER_TAG
from sensors.retraining import (
    DRIFT_BATCH_TAG,
    DRIFT_REASON_TAG,
    DRIFT_TRIGGER,
    RETRAIN_ASSETS,
    TRIGGER_TAG,
    drift_retrain_sensor,
    event_tag,
    retraining_state,
)

RUN_KEY_TAG = "dagster/run_key"

# --------------------------------------------------------------------------- production_batches_sensor


def make_batch(landing: Path, batch: str, files: int = 2, ready: bool = True) -> Path:
    folder = landing / "production" / batch
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"{i}.png").write_bytes(b"fake-image-%d" % i)
    if ready:
        (folder / "_READY").write_text(f"files={files}")
    return folder


def write_labels(landing: Path, batch: str, data: bytes | str, mtime_ns: int | None = None) -> Path:
    path = landing / "production" / batch / "labels.csv"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def tick(instance: DagsterInstance, landing: Path, cursor: str | None, served: bool = True) -> SensorResult:
    """One tick on the landing zone ``landing`` (its artifact store beside it, serving a model
    unless ``served`` is false)."""
    artifacts = landing.parent / f"{landing.name}-artifacts"
    storage = ArtifactStorage(str(artifacts))
    if served and not storage.exists(SERVING_KEY):
        serve(storage, "m-served")
    resources = {"image_source": ImageSource(root=str(landing)), "artifact_store": ArtifactStore(root=str(artifacts))}
    # A context manager: the stores hold the `s3` resource, a nested resource Dagster sets up and
    # tears down around the evaluation (as the daemon does).
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = production_batches_sensor(context)
    assert isinstance(result, SensorResult)
    return result


def test_nothing_is_requested_before_a_runtime_is_served(tmp_path: Path) -> None:
    """Batches that arrive before the first champion wait, unseen, and are requested once one is served."""
    landing = tmp_path / "landing"
    make_batch(landing, "p1")
    with instance_for_test() as instance:
        waiting = tick(instance, landing, None, served=False)
        assert waiting.run_requests == [] and waiting.dynamic_partitions_requests == []
        assert "no runtime is served yet" in waiting.skip_reason.skip_message
        served = tick(instance, landing, waiting.cursor)
        (request,) = served.run_requests
        assert request.partition_key == "p1"


def apply(instance: DagsterInstance, result: SensorResult) -> None:
    """What the daemon does with a tick's partition requests."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def test_a_complete_batch_is_one_partition_and_one_run_then_nothing(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        (request,) = first.run_requests
        assert request.partition_key == "p1" and request.run_key.startswith("p1:")
        assert request.asset_selection is None  # the whole production_job
        assert request.tags[PRODUCTION_BATCH_TAG] == "p1" and request.tags[PRODUCTION_TRIGGER_TAG] == "production_batch"
        assert [(r.partitions_def_name, list(r.partition_keys)) for r in first.dynamic_partitions_requests] == [
            ("production_batches", ["p1"])
        ]
        assert set(json.loads(first.cursor)["batches"]) == {"p1"}
        apply(instance, first)

        again = tick(instance, tmp_path, first.cursor)
        assert again.run_requests == [] and again.dynamic_partitions_requests == []
        assert again.skip_reason


def test_a_batch_without_ready_is_left_for_later(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1", ready=False)
    write_labels(tmp_path, "p1", "file,label\n0.png,cat\n")
    with instance_for_test() as instance:
        result = tick(instance, tmp_path, None)
        assert result.run_requests == [] and result.dynamic_partitions_requests == []
        assert json.loads(result.cursor)["batches"] == {}
        (tmp_path / "production" / "p1" / "_READY").write_text("")
        later = tick(instance, tmp_path, result.cursor)
        assert [r.partition_key for r in later.run_requests] == ["p1"]


def test_labels_arriving_and_changing_are_labels_only_runs(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        apply(instance, first)
        (batch_run,) = first.run_requests

        write_labels(tmp_path, "p1", "file,label\n0.png,cat\n", mtime_ns=1_700_000_000_000_000_000)
        labels = tick(instance, tmp_path, first.cursor)
        (request,) = labels.run_requests
        assert request.partition_key == "p1"
        assert request.asset_selection == [AssetKey(name) for name in LABELS_ASSETS]
        assert set(request.asset_selection) == {AssetKey("batch_predictions"), AssetKey("review_feedback")}
        assert request.tags[PRODUCTION_TRIGGER_TAG] == "production_labels"
        assert request.run_key != batch_run.run_key and request.run_key.startswith(batch_run.run_key)
        assert labels.dynamic_partitions_requests == []

        assert tick(instance, tmp_path, labels.cursor).run_requests == []

        write_labels(tmp_path, "p1", "file,label\n0.png,dog\n1.png,cat\n", mtime_ns=1_700_000_100_000_000_000)
        changed = tick(instance, tmp_path, labels.cursor)
        (again,) = changed.run_requests
        assert again.asset_selection == request.asset_selection
        assert again.run_key not in (request.run_key, batch_run.run_key)
        assert tick(instance, tmp_path, changed.cursor).run_requests == []


def test_labels_present_with_the_batch_ride_on_its_first_run(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1")
    write_labels(tmp_path, "p1", "file,label\n0.png,cat\n")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        assert [r.asset_selection for r in first.run_requests] == [None]
        apply(instance, first)
        assert tick(instance, tmp_path, first.cursor).run_requests == []


def test_a_changed_batch_is_requested_again_without_a_new_partition(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1")
    make_batch(tmp_path, "p2")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        assert sorted(r.partition_key for r in first.run_requests) == ["p1", "p2"]
        assert sorted(k for r in first.dynamic_partitions_requests for k in r.partition_keys) == ["p1", "p2"]
        apply(instance, first)
        make_batch(tmp_path, "p1", files=3)  # a late file, and _READY rewritten
        changed = tick(instance, tmp_path, first.cursor)
        (request,) = changed.run_requests
        assert request.partition_key == "p1" and request.asset_selection is None
        assert request.run_key not in {r.run_key for r in first.run_requests}
        assert changed.dynamic_partitions_requests == []
        assert tick(instance, tmp_path, changed.cursor).run_requests == []


def test_a_rewritten_ready_marker_without_changes_is_no_request(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        apply(instance, first)
        (tmp_path / "production" / "p1" / "_READY").write_text("touched, same images")
        assert tick(instance, tmp_path, first.cursor).run_requests == []


@pytest.mark.parametrize("kind", ["binary", "bad_header", "empty", "non_utf8", "symlink", "directory", "fifo", "unreadable", "huge_sparse"])
def test_a_malformed_or_unreadable_labels_file_never_breaks_the_tick(tmp_path: Path, kind: str) -> None:
    folder = make_batch(tmp_path, "p1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        apply(instance, first)
        path = folder / "labels.csv"
        if kind == "binary":
            path.write_bytes(bytes(range(256)) * 8)
        elif kind == "bad_header":
            path.write_text("name,label\n0.png,cat\n")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "non_utf8":
            path.write_bytes(b"file,label\n0.png,\xff\xfe\n")
        elif kind == "symlink":
            os.symlink("/etc/passwd", path)
        elif kind == "directory":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "unreadable":
            path.write_text("file,label\n0.png,cat\n")
            path.chmod(0)
        elif kind == "huge_sparse":
            with path.open("wb") as f:
                f.truncate(200 * 1024 * 1024)
        result = tick(instance, tmp_path, first.cursor)  # never raises: the run reads and judges the file
        requests = result.run_requests
        if kind == "directory":  # a folder named labels.csv is no labels file
            assert requests == []
        else:
            assert len(requests) == 1 and requests[0].asset_selection == [AssetKey(n) for n in LABELS_ASSETS]
        assert tick(instance, tmp_path, result.cursor).run_requests == []


def test_a_failed_batch_run_is_requested_again(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        apply(instance, first)
        (request,) = first.run_requests
        create_run_for_test(instance, job_name="production_job", status=DagsterRunStatus.FAILURE, tags={RUN_KEY_TAG: request.run_key})
        retry = tick(instance, tmp_path, first.cursor)
        (again,) = retry.run_requests
        assert again.partition_key == "p1" and again.asset_selection is None and again.run_key == f"{request.run_key}:retry1"


def test_a_failed_batch_run_is_retried_even_after_a_labels_run(tmp_path: Path) -> None:
    make_batch(tmp_path, "p1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        apply(instance, first)
        (batch_run,) = first.run_requests
        write_labels(tmp_path, "p1", "file,label\n0.png,cat\n")
        labels = tick(instance, tmp_path, first.cursor)  # the first run is still in flight
        for labels_run in labels.run_requests:  # (today: one labels-only run)
            create_run_for_test(instance, job_name="production_job", status=DagsterRunStatus.SUCCESS, tags={RUN_KEY_TAG: labels_run.run_key})
        create_run_for_test(instance, job_name="production_job", status=DagsterRunStatus.FAILURE, tags={RUN_KEY_TAG: batch_run.run_key})
        retry = tick(instance, tmp_path, labels.cursor)
        # The whole production_job (drift_report included) is requested again for the batch.
        assert [(r.partition_key, r.asset_selection) for r in retry.run_requests] == [("p1", None)]


def test_a_batch_already_predicted_elsewhere_is_not_requested_again(tmp_path: Path) -> None:
    from cvops_dagster.ingestion.landing import LandingZone
    from cvops_dagster.ingestion.production import production_batch

    make_batch(tmp_path, "p1")
    fingerprint = production_batch(LandingZone(str(tmp_path)), "p1").fingerprint
    with instance_for_test() as instance:
        # `cvops run` predicted p1 before the sensor ever ran (empty cursor).
        instance.add_dynamic_partitions("production_batches", ["p1"])
        instance.report_runless_asset_event(
            AssetMaterialization(asset_key="batch_predictions", partition="p1", metadata={"fingerprint": fingerprint})
        )
        result = tick(instance, tmp_path, None)
        assert result.run_requests == [] and result.dynamic_partitions_requests == []
        assert set(json.loads(result.cursor)["batches"]) == {"p1"}
        # Labels newer than that run's are news: a labels-only run, once.
        write_labels(tmp_path, "p1", "file,label\n0.png,cat\n")
        labels = tick(instance, tmp_path, result.cursor)
        assert [r.asset_selection for r in labels.run_requests] == [[AssetKey(n) for n in LABELS_ASSETS]]
        assert tick(instance, tmp_path, labels.cursor).run_requests == []
        # A lost cursor again, with labels the last run already read: nothing.
        stamp = LandingZone(str(tmp_path)).labels_fingerprint("p1")
        instance.report_runless_asset_event(
            AssetMaterialization(asset_key="batch_predictions", partition="p1", metadata={"fingerprint": fingerprint, "labels_fingerprint": stamp})
        )
        assert tick(instance, tmp_path, None).run_requests == []
        # Changed images are a new run, whatever was predicted before.
        make_batch(tmp_path, "p1", files=3)
        assert [r.asset_selection for r in tick(instance, tmp_path, None).run_requests] == [None]


# --------------------------------------------------------------------------- drift_retrain_sensor

CHAMPION = "model-a"


def serve(storage: ArtifactStorage, model_id: str) -> None:
    """Point production/serving.json at ``model_id`` (the pointer alone: the sensor reads nothing else)."""
    pointer = ServingPointer(model_id=model_id, dataset_version="v1", fp32_key=f"runtimes/{model_id}.onnx", fp32_sha256="0" * 64)
    storage.write_json(SERVING_KEY, pointer.to_dict())


def report_drift(instance: DagsterInstance, batch: str, model_id: str = CHAMPION, drift: bool | None = True, fingerprint: str = "f1") -> str:
    event = f"{batch}:{fingerprint}:{model_id}"
    instance.report_runless_asset_event(
        AssetMaterialization(
            asset_key="drift_report", partition=batch,
            metadata={"event": event, "model_id": model_id, "drift": drift, "score": 0.999 if drift else 0.2, "threshold": 0.95},
        )
    )  # fmt: skip
    return event


def report_feedback(instance: DagsterInstance, version: str, labelled: int) -> None:
    instance.report_runless_asset_event(
        AssetMaterialization(asset_key="review_feedback", metadata={"version": version, "labelled_samples": labelled})
    )


def report_dataset(instance: DagsterInstance, feedback_version: str | None) -> None:
    instance.report_runless_asset_event(
        AssetMaterialization(asset_key="cleaned_dataset", metadata={"version": "d2", "review_feedback_version": feedback_version or ""})
    )


def skip(result: SensorResult) -> str:
    reason = result.skip_reason
    return str(getattr(reason, "skip_message", reason) or "")


def retrain_tick(instance: DagsterInstance, artifacts: Path, cursor: str | None) -> SensorResult:
    resources = {"artifact_store": ArtifactStore(root=str(artifacts))}
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = drift_retrain_sensor(context)
    assert isinstance(result, SensorResult)
    return result


def submit(instance: DagsterInstance, request, status: DagsterRunStatus = DagsterRunStatus.SUCCESS) -> None:  # noqa: ANN001
    """The run the daemon launches for ``request`` (its tags and run key)."""
    create_run_for_test(instance, job_name="lifecycle_job", status=status, tags={**request.tags, RUN_KEY_TAG: request.run_key})


@pytest.fixture
def artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CVOPS_RETRAIN_CONFIG", raising=False)
    root = tmp_path / "artifacts"
    serve(ArtifactStorage(str(root)), CHAMPION)
    return root


def test_drift_waits_for_labels_then_requests_exactly_once(artifacts: Path) -> None:
    with instance_for_test() as instance:
        event = report_drift(instance, "p1")
        waiting = retrain_tick(instance, artifacts, None)
        assert waiting.run_requests == []
        assert "waiting" in skip(waiting) and "p1" in skip(waiting)
        assert json.loads(waiting.cursor) == {"handled": {}}

        report_feedback(instance, "fb1", 0)  # collected, nothing labelled yet
        still = retrain_tick(instance, artifacts, waiting.cursor)
        assert still.run_requests == [] and "waiting" in skip(still)

        report_feedback(instance, "fb2", 7)
        asked = retrain_tick(instance, artifacts, still.cursor)
        (request,) = asked.run_requests
        assert request.tags[TRIGGER_TAG] == DRIFT_TRIGGER
        assert request.tags[DRIFT_BATCH_TAG] == "p1"
        assert request.tags[event_tag(event)] == "p1"
        assert "p1" in request.tags[DRIFT_REASON_TAG] and "fb2" in request.tags[DRIFT_REASON_TAG]
        assert request.run_key.startswith("drift-retrain:")
        assert set(request.asset_selection) == {AssetKey(a) for a in RETRAIN_ASSETS}
        assert request.partition_key is None
        assert json.loads(asked.cursor)["handled"] == {event: request.run_key}

        second = retrain_tick(instance, artifacts, asked.cursor)
        assert second.run_requests == []

        # A re-materialized report of the same event: nothing new.
        report_drift(instance, "p1")
        assert retrain_tick(instance, artifacts, asked.cursor).run_requests == []


def test_a_lost_cursor_never_asks_twice_once_the_run_exists(artifacts: Path) -> None:
    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        (request,) = retrain_tick(instance, artifacts, None).run_requests
        submit(instance, request)
        lost = retrain_tick(instance, artifacts, None)
        assert lost.run_requests == [] and "no open drift event" in skip(lost)
        report_drift(instance, "p1")  # re-materialized, same event
        assert retrain_tick(instance, artifacts, None).run_requests == []


def test_a_failed_retraining_is_requested_again_a_bounded_number_of_times(artifacts: Path) -> None:
    """A crashed retraining leaves the drift unaddressed: it is requested again under a new run key
    (Dagster skips a key a sensor used), at most three runs in all; a successful one ends it."""
    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        result = retrain_tick(instance, artifacts, None)
        keys = []
        for _ in range(3):
            (request,) = result.run_requests
            keys.append(request.run_key)
            submit(instance, request, DagsterRunStatus.FAILURE)
            result = retrain_tick(instance, artifacts, result.cursor)
        assert result.run_requests == [], "three failed attempts: given up"
        assert len(set(keys)) == 3 and keys[1] == f"{keys[0]}:retry1" and keys[2] == f"{keys[0]}:retry2"

    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        first = retrain_tick(instance, artifacts, None)
        submit(instance, first.run_requests[0], DagsterRunStatus.FAILURE)
        second = retrain_tick(instance, artifacts, first.cursor)
        submit(instance, second.run_requests[0], DagsterRunStatus.SUCCESS)
        assert retrain_tick(instance, artifacts, second.cursor).run_requests == []
        assert retrain_tick(instance, artifacts, None).run_requests == []  # cursor lost too


def test_two_drifted_batches_are_one_retraining(artifacts: Path) -> None:
    with instance_for_test() as instance:
        first, second = report_drift(instance, "p1"), report_drift(instance, "p2")
        report_drift(instance, "p3", drift=False)
        report_drift(instance, "p4", drift=None)  # too few images for a verdict
        report_feedback(instance, "fb1", 5)
        result = retrain_tick(instance, artifacts, None)
        (request,) = result.run_requests
        assert request.tags["cvops/drift_batches"] == "p1,p2"
        assert {t for t in request.tags if t.startswith("cvops/drift_event.")} == {event_tag(first), event_tag(second)}


def test_a_retraining_in_flight_makes_new_events_wait(artifacts: Path) -> None:
    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        asked = retrain_tick(instance, artifacts, None)
        submit(instance, asked.run_requests[0], DagsterRunStatus.STARTED)
        report_drift(instance, "p2")
        report_feedback(instance, "fb2", 9)
        waiting = retrain_tick(instance, artifacts, asked.cursor)
        assert waiting.run_requests == [] and "in flight" in skip(waiting)
        decision = retraining_state(instance, ArtifactStorage(str(artifacts)), json.loads(asked.cursor)["handled"]).decision
        assert [e.batch_id for e in decision.waiting] == ["p2"]


def test_feedback_already_in_a_dataset_version_waits(artifacts: Path) -> None:
    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        report_dataset(instance, "fb1")
        result = retrain_tick(instance, artifacts, None)
        assert result.run_requests == [] and "already in a dataset version" in skip(result)


def test_a_new_champion_closes_the_old_models_events(artifacts: Path) -> None:
    storage = ArtifactStorage(str(artifacts))
    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        asked = retrain_tick(instance, artifacts, None)
        (request,) = asked.run_requests
        submit(instance, request)
        report_dataset(instance, "fb1")  # the retraining's dataset included the feedback
        serve(storage, "model-b")  # ...and its challenger won the gate
        report_drift(instance, "p2", model_id=CHAMPION)  # a report made against the replaced model
        closed = retrain_tick(instance, artifacts, asked.cursor)
        assert closed.run_requests == [] and "no open drift event" in skip(closed)
        assert retraining_state(instance, storage).decision.waiting == ()

        # The new champion drifting on the same labels waits: they are already in its dataset.
        report_drift(instance, "p1", model_id="model-b")
        waits = retrain_tick(instance, artifacts, closed.cursor)
        assert waits.run_requests == [] and "already in a dataset version" in skip(waits)
        # New labels: one new retraining, another run key.
        report_feedback(instance, "fb2", 8)
        (again,) = retrain_tick(instance, artifacts, waits.cursor).run_requests
        assert again.run_key != request.run_key and again.tags[DRIFT_BATCH_TAG] == "p1"


def test_nothing_served_means_nothing_requested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CVOPS_RETRAIN_CONFIG", raising=False)
    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        result = retrain_tick(instance, tmp_path / "empty-artifacts", None)
        assert result.run_requests == [] and "no open drift event" in skip(result)


def test_the_retraining_run_config_comes_from_cvops_retrain_config(artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "retrain.yaml"
    config.write_text("ops:\n  hpo_study:\n    config:\n      n_trials: 2\n")
    monkeypatch.setenv("CVOPS_RETRAIN_CONFIG", str(config))
    with instance_for_test() as instance:
        report_drift(instance, "p1")
        report_feedback(instance, "fb1", 5)
        (request,) = retrain_tick(instance, artifacts, None).run_requests
        assert request.run_config == {"ops": {"hpo_study": {"config": {"n_trials": 2}}}}
        config.write_text("- not a mapping\n")
        bad = retrain_tick(instance, artifacts, None)
        assert bad.run_requests == [] and "run config" in skip(bad)


def test_labels_count_as_used_only_by_a_dataset_whose_run_went_through() -> None:
    """A retraining that cleaned the labelled images into a dataset and then failed (in training,
    say) has not used them: the labels stay new, so the drift can be retried."""
    from dagster import MaterializeResult, asset, materialize

    from sensors.retraining import labels_state

    def dataset_run(instance: DagsterInstance, version: str, fail_after: bool) -> None:
        @asset(name="cleaned_dataset")
        def dataset():  # noqa: ANN202 - Dagster resolves annotations, and this module's are strings
            return MaterializeResult(metadata={"review_feedback_version": version})

        @asset(deps=[dataset])
        def training():  # noqa: ANN202
            if fail_after:
                raise RuntimeError("killed in training")

        materialize([dataset, training], instance=instance, raise_on_error=False)

    with instance_for_test() as instance:
        report_feedback(instance, "fb1", 5)
        dataset_run(instance, "fb1", fail_after=True)
        assert labels_state(instance).new_labels
        dataset_run(instance, "fb1", fail_after=False)
        assert not labels_state(instance).new_labels
