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
    second = status["onnx_runtime"]["model_id"]
    assert second != first
    before, after = _holdout_accuracy(tmp_path / "artifacts", first), _holdout_accuracy(tmp_path / "artifacts", second)
    assert after > before + 0.1, (before, after)
