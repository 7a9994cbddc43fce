"""The issue's "done when", with the real daemon: `cvops watch` running, a drifted production batch
and then its delayed labels dropped into the landing zone lead, with no other action, to a drift
report that flags it, exactly one retraining run, a new champion served and an accuracy gain on
held-out drifted images; an in-distribution batch raises nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.test_services import _env, _start, _stop_and_time, _wait_for_daemon
from tests.test_cli import cvops

pytestmark = pytest.mark.slow

#: A small budget for both trainings. The gate's in-distribution tolerance is widened: two small
#: models can differ by an image or two on the ~110-image test split, and this test is about the
#: loop (the gate's own rule has its tests).
FAST = """
ops:
  hpo_study: {config: {n_trials: 2, max_epochs: 2}}
  trained_model: {config: {max_epochs: 6, accuracy_floor: 0.0}}
  production_model: {config: {regression_tolerance: 0.05}}
"""
#: Bounded waits: a sensor ticks every 30 s; a fast retraining takes about two minutes here.
REPORT_WAIT_S = 300
RETRAIN_WAIT_S = 900
#: review_sensor ticks every 30 s; then review_feedback and cleaned_dataset run.
REVIEW_WAIT_S = 240


def _drop_batch(landing: Path, batch_id: str) -> None:
    """Write one batch of the bundled production stream: images, then _READY (no labels)."""
    from cvops_dagster.monitoring.sample_stream import production_stream

    batch = next(b for b in production_stream() if b.batch_id == batch_id)
    folder = landing / "production" / batch_id
    folder.mkdir(parents=True)
    for name, data in batch.files.items():
        (folder / name).write_bytes(data)
    (folder / "_READY").write_bytes(b"")


def _status(tmp_path: Path) -> dict:
    return json.loads(cvops("status", "--json", cwd=tmp_path, env=_env(tmp_path)).stdout)


def _wait(what: str, predicate, timeout_s: float, watch, log: Path):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert watch.poll() is None, f"cvops watch ended while waiting for {what}:\n{log.read_text()[-5000:]}"
        value = predicate()
        if value:
            return value
        time.sleep(3)
    raise AssertionError(f"no {what} within {timeout_s}s:\n{log.read_text()[-5000:]}")


class _Watcher:
    """Cheap polls of the instance and the artifact store from this process, while the daemon
    works (a `cvops status` per poll would load the code location each time and take CPU from
    the very runs waited on); `cvops status --json` is read at the points asserted on."""

    def __init__(self, tmp_path: Path) -> None:
        from dagster import DagsterInstance

        from cvops_dagster.core.storage import ArtifactStorage

        self.instance = DagsterInstance.from_config(str(tmp_path / ".dagster_home"))
        self.storage = ArtifactStorage(str(tmp_path / "artifacts"))

    def reports(self) -> dict:
        from sensors.retraining import drift_events

        return {e.batch_id: e for e in drift_events(self.instance)}

    def retraining(self):  # noqa: ANN201
        from sensors.retraining import retraining_state

        return retraining_state(self.instance, self.storage)


def _review_in_fiftyone(watcher: _Watcher) -> tuple[str, str, str]:
    """Relabel one test-split image and discard one labelled production image, as the App
    writes them (``ground_truth`` + tag ``reviewed``; tag ``discard``). Returns their sample
    ids and the new label."""
    import os

    import fiftyone as fo

    from cvops_dagster.core.settings import REVIEW_PREFIX_ENV
    from cvops_dagster.review.connection import configure, database_from_env, dataset_name

    configure(database_from_env())  # the session's database, which the daemon's runs use too
    dataset = fo.load_dataset(dataset_name(os.environ[REVIEW_PREFIX_ENV]))
    sample = dataset.match_tags("test_split").sort_by("cvops_sample_id").first()
    new_label = next(str(d) for d in range(10) if str(d) != sample.ground_truth.label)
    sample["ground_truth"] = fo.Classification(label=new_label)
    sample.tags.append("reviewed")
    sample.save()
    from dagster import AssetKey

    from fiftyone import ViewField as F

    feedback = watcher.instance.get_latest_materialization_event(AssetKey("review_feedback")).asset_materialization
    labelled = set(watcher.storage.read_parquet(feedback.metadata["manifest_key"].value)["sample_id"])
    production = dataset.match_tags("production").match(F("cvops_sample_id").is_in(sorted(labelled))).first()
    production.tags.append("discard")
    production.save()
    return sample.cvops_sample_id, production.cvops_sample_id, new_label


def _reviewed_dataset(tmp_path: Path, watcher: _Watcher):  # noqa: ANN202 - (figures, manifest) or None
    """The latest cleaned_dataset's figures and manifest once a review_job made it."""
    from dagster import AssetKey

    from cvops_dagster.core.contracts import dataset_keys

    event = watcher.instance.get_latest_materialization_event(AssetKey("cleaned_dataset"))
    run = watcher.instance.get_run_by_id(event.run_id) if event is not None else None
    if run is None or run.job_name != "review_job":
        return None
    figures = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    return figures, watcher.storage.read_parquet(dataset_keys(figures["version"])[0])


def _holdout_accuracy(artifacts: Path, model_id: str) -> float:
    from cvops_dagster.core.storage import ArtifactStorage
    from cvops_dagster.monitoring.sample_stream import drifted_holdout
    from cvops_dagster.registry.history import replay_history
    from cvops_dagster.serving.predictor import Predictor

    storage = ArtifactStorage(str(artifacts))
    runtime = replay_history(storage).published_event(model_id)["runtime"]
    images, labels = drifted_holdout()
    predicted = Predictor(storage.local_path(runtime["fp32_key"]), expected_sha256=runtime["fp32_sha256"]).predict(images).labels
    return sum(p == str(t) for p, t in zip(predicted, labels, strict=True)) / len(labels)


@pytest.mark.timeout(1800)
def test_drifted_batch_then_labels_retrain_once_and_the_new_champion_gains_on_drifted_images(tmp_path: Path) -> None:
    from cvops_dagster.monitoring.sample_stream import delayed_labels, write_delayed_labels

    env = _env(tmp_path)
    (tmp_path / "fast.yaml").write_text(FAST)
    env["CVOPS_RETRAIN_CONFIG"] = str(tmp_path / "fast.yaml")
    cvops("seed", "--no-production", cwd=tmp_path, env=env)
    cvops("run", "--config", "fast.yaml", cwd=tmp_path, env=env)
    first = _status(tmp_path)["production_model"]["model_id"]

    watch, log = _start(tmp_path, "watch")
    watcher = None
    try:
        _wait_for_daemon(tmp_path, watch, log)
        landing = tmp_path / "landing"
        _drop_batch(landing, "prod_001")  # in distribution
        _drop_batch(landing, "prod_003")  # the new camera

        watcher = _Watcher(tmp_path)
        _wait("two drift reports", lambda: len(watcher.reports()) == 2, REPORT_WAIT_S, watch, log)
        # Drift but no labels: the retraining waits, nothing is requested.
        _wait("a waiting drift event", lambda: watcher.retraining().decision.waiting, 120, watch, log)
        status = _status(tmp_path)
        reports = status["drift_report"]["batches"]
        assert reports["prod_001"]["drift"] is False, reports["prod_001"]
        assert reports["prod_003"]["drift"] is True, reports["prod_003"]
        assert reports["prod_003"]["score"] >= reports["prod_003"]["threshold"]
        assert reports["prod_003"]["model_id"] == first
        assert [w["report"] for w in status["retraining"]["waiting"]] == ["prod_003"]
        assert status["retraining"]["requests"] == []
        checks = status["drift_report"]["checks"]["check_drift_report_within_threshold"]
        assert checks["severity"] == "WARN" and checks["failed_partitions"] == ["prod_003"]

        # The labels arrive: one retraining, a new champion served.
        write_delayed_labels(str(landing), "prod_003", delayed_labels("prod_003"))

        def retrained() -> bool:
            requests = watcher.retraining().requests
            return bool(requests) and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in requests)

        _wait("the retraining run", retrained, RETRAIN_WAIT_S, watch, log)
        time.sleep(35)  # another tick of every sensor: nothing else may be requested
        status = _status(tmp_path)

        # A reviewer in the FiftyOne App (its writes, through FiftyOne's API): a training image
        # relabelled, a production image discarded. review_sensor alone takes them to the next
        # dataset version.
        corrected, discarded, new_label = _review_in_fiftyone(watcher)
        review_status = _wait("a dataset version with the review", lambda: _reviewed_dataset(tmp_path, watcher), REVIEW_WAIT_S, watch, log)
    finally:
        if watcher is not None:
            watcher.instance.dispose()
        if watch.poll() is None:
            _stop_and_time(watch, signal.SIGTERM, log)

    requests = status["retraining"]["requests"]
    assert len(requests) == 1, requests
    assert requests[0]["report"] == "prod_003" and requests[0]["status"] == "SUCCESS" and "drift" in requests[0]["reason"]
    assert status["retraining"]["waiting"] == []
    assert status["batch_predictions"]["batches"]["prod_003"]["accuracy"] is not None  # realised accuracy of the old model
    assert status["review_feedback"]["labelled_samples"] == len(delayed_labels("prod_003"))
    # The review reached the next dataset version: the override recorded, the discard quarantined.
    figures, manifest = review_status
    assert figures["review_overrides"] >= 1 and figures["review_discards"] >= 1, figures
    relabelled = manifest[manifest["sample_id"] == corrected]
    assert len(relabelled) >= 1 and set(relabelled["label"].astype(str)) == {new_label}
    gone = manifest[manifest["sample_id"] == discarded]
    assert len(gone) >= 1 and set(gone["reason"]) == {"review_discard"}
    second = status["onnx_runtime"]["model_id"]
    assert second != first
    before, after = _holdout_accuracy(tmp_path / "artifacts", first), _holdout_accuracy(tmp_path / "artifacts", second)
    assert after > before + 0.1, (before, after)
