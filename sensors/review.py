"""review_sensor: new or changed reviews in the FiftyOne App reach the next dataset version.

Every 30 s, once ``edge_case_review`` has built the review dataset, the sensor reads a short
summary of the reviews (:func:`cvops_dagster.review.reviews.review_state`: how many samples are
tagged ``reviewed``/``discard``, the newest ``last_modified_at`` among them, a digest of their
tags and labels). The cursor is that summary; when it changes, one ``review_job`` run is
requested, keyed by the digest (the same reviews never ask twice, even after a lost cursor):

- ``review_feedback`` reads the reviews back (its ``fiftyone`` source);
- ``cleaned_dataset`` makes the next dataset version with them, when ``CVOPS_RETRAIN_ON``
  includes ``new_data`` (the default; the automation then carries the new version through
  training like a new batch). Without it, only ``review_feedback`` runs and the retraining
  policy (``drift_retrain_sensor``: an open drift event plus labels no dataset has used) decides.

Reviews present when the dataset is first seen count too: nothing a reviewer did is skipped.
"""

from __future__ import annotations

from dagster import AssetKey, DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, sensor

from resources.review import FiftyOneConnection

REVIEW_STATE_TAG = "cvops/review_state"
NO_REVIEW_DATASET = "no review dataset yet (edge_case_review has not run)"


@sensor(
    job_name="review_job",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches the FiftyOne review dataset: when samples are tagged reviewed/discard (or their labels change), "
    "requests review_job (review_feedback, and the next cleaned_dataset version when CVOPS_RETRAIN_ON includes new_data).",
)
def review_sensor(context: SensorEvaluationContext, fiftyone: FiftyOneConnection) -> SensorResult:
    if context.instance.get_latest_materialization_event(AssetKey("edge_case_review")) is None:
        # FiftyOne (and its mongod) only start once there is something to watch.
        return SensorResult(skip_reason=NO_REVIEW_DATASET, cursor=context.cursor)
    from cvops_dagster.review.reviews import review_state

    fiftyone.connect()
    state = review_state(fiftyone.dataset_name)
    if state is None:
        return SensorResult(skip_reason=f"review dataset {fiftyone.dataset_name} not found in {fiftyone.describe()}", cursor=context.cursor)
    count, digest = state.split(":", 1)[0], state.rsplit(":", 1)[-1]
    if state == context.cursor:
        return SensorResult(skip_reason=f"no new review ({count} reviewed or discarded samples)", cursor=context.cursor)
    if int(count) == 0 and not context.cursor:
        return SensorResult(skip_reason="no review yet", cursor=state)
    return SensorResult(
        run_requests=[RunRequest(run_key=f"review:{count}:{digest}", tags={"cvops/trigger": "review", REVIEW_STATE_TAG: state})],
        cursor=state,
    )
