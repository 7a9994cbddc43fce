"""batch_predictions, drift_report and review_feedback: the production side of the lifecycle.

Each complete production batch is one ``production_batches`` partition; ``production_batches_sensor``
requests one run of ``production_job`` for it (predictions, drift report, feedback), and a run of
``batch_predictions`` + ``review_feedback`` when its ``labels.csv`` arrives or changes.

ONNX Runtime and the drift tests load inside the asset bodies (see assets/training.py for why).
"""

from collections.abc import Callable

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    Config,
    DataVersion,
    MaterializeResult,
    asset,
)
from pydantic import Field

from assets.metadata import (
    ASSET_OWNERS,
    BOOL,
    FLOAT,
    STRING,
    artifact,
    counts_table,
    figure,
    json_value,
    png_markdown,
    records_table,
    safe_metadata,
    table,
)
from assets.partitions import production_batches
from resources.review import FiftyOneConnection
from resources.storage import ArtifactStore, ImageSource

CHECK_DRIFT = "check_drift_report_within_threshold"
CHECK_PREDICTIONS = "check_batch_predictions_not_empty"
#: Prefix of the drift event id the retraining sensor keys its requests on.
DRIFT_EVENT_SEP = ":"


def drift_event_id(batch_id: str, fingerprint: str, model_id: str) -> str:
    """One drift event: a batch (as its images are now) judged against one served model.
    A re-materialized report of the same batch for the same model is the same event."""
    return DRIFT_EVENT_SEP.join((batch_id, fingerprint, model_id))


def _plot(make: Callable[[], bytes], alt: str, log) -> dict:  # noqa: ANN001
    """``{alt: inline PNG}``, or nothing when the plot cannot be drawn (logged, never a failed step)."""
    try:
        return {alt: png_markdown(make(), alt.replace("_", " "))}
    except Exception as exc:  # noqa: BLE001 - a figure must not fail the step
        log.warning(f"no {alt}: {type(exc).__name__}: {exc}")
        return {}


def _latest_partition_metadata(context: AssetExecutionContext, asset_name: str, partition: str) -> dict | None:
    """The metadata of ``asset_name``'s materialization for ``partition`` made in this run,
    else its latest one; ``None`` when it was never materialized."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset_name), asset_partitions=[partition]), limit=20
    ).records
    if not records:
        return None
    mine = [r for r in records if r.run_id == context.run.run_id]
    record = (mine or records)[0]
    return {name: value.value for name, value in record.asset_materialization.metadata.items()} | {"run_id": record.run_id}


# --------------------------------------------------------------------------- batch_predictions


class BatchPredictionsConfig(Config):
    workers: int | None = Field(default=None, description="decode worker processes (default: one per core)")
    reuse: bool = Field(
        default=True,
        description="keep the stored predictions when the batch's images are unchanged (a labels-only run records the "
        "realised accuracy of the model that served the batch instead of predicting again with today's model)",
    )


@asset(
    partitions_def=production_batches,
    group_name="monitoring",
    kinds={"onnx", "parquet"},
    code_version="1",
    owners=ASSET_OWNERS,
    check_specs=[
        AssetCheckSpec(
            CHECK_PREDICTIONS,
            asset="batch_predictions",
            description="The batch holds at least one image the served runtime could predict.",
        )
    ],
    description="The served runtime (`production/serving.json`, pinned by hash) on every image of a production "
    "batch: label, confidence, probabilities, embedding and the image features per image, written to "
    "`monitoring/predictions/<batch_id>.parquet`. Files the landing rules or the safe decoder refuse are "
    "quarantined with their reason. Once `labels.csv` arrives, the realised accuracy of the model that served "
    "the batch.",
)
def batch_predictions(
    context: AssetExecutionContext, config: BatchPredictionsConfig, image_source: ImageSource, artifact_store: ArtifactStore
) -> MaterializeResult:
    from cvops_dagster.ingestion.production import production_batch, production_batch_labels
    from cvops_dagster.monitoring.plots import confidence_histogram_png
    from cvops_dagster.monitoring.predictions import (
        STATUS_PREDICTED,
        predict_batch,
        predictions_key,
        read_predictions,
        realised_accuracy,
    )
    from cvops_dagster.serving.pointer import open_production_predictor
    from cvops_dagster.training.model_store import load_card

    storage, landing, batch_id = artifact_store.storage, image_source.landing(), context.partition_key
    batch = production_batch(landing, batch_id)
    previous = _latest_partition_metadata(context, "batch_predictions", batch_id)
    stored = read_predictions(storage, batch_id) if config.reuse and previous else None
    reused = stored is not None and previous.get("fingerprint") == batch.fingerprint
    if reused:
        frame, figures = stored, dict(previous)
        context.log.info(f"batch {batch_id}: images unchanged; keeping the predictions of model {figures.get('model_id')}")
    else:
        predictor = open_production_predictor(storage)
        result = predict_batch(landing, storage, batch_id, predictor, workers=config.workers)
        frame = result.frame
        figures = {
            **result.summary(), "images_per_second": figure(result.images_per_second),
            "decode_seconds": figure(result.timings["decode"]), "predict_seconds": figure(result.timings["predict"]),
        }  # fmt: skip
    predicted = frame[frame["status"] == STATUS_PREDICTED]
    model_id = str(predicted["model_id"].iloc[0]) if len(predicted) else str(figures.get("model_id"))
    labels = production_batch_labels(landing, batch, set(load_card(storage, model_id)["labels"])) if len(predicted) else None
    accuracy, labelled = realised_accuracy(frame, labels.labels) if labels is not None and labels.ok else (None, 0)
    lost = frame[frame["status"] != STATUS_PREDICTED]
    reasons = lost["reason"].astype(str).value_counts().to_dict()
    class_counts = predicted["label"].astype(str).value_counts().to_dict()
    context.log.info(f"batch {batch_id}: {len(predicted)} predicted, {len(lost)} quarantined; accuracy {accuracy}")
    return MaterializeResult(
        metadata=safe_metadata({
            "images": len(predicted),
            "quarantined": len(lost),
            "quarantine_reasons": counts_table(reasons, "reason", "files"),
            "quarantine_examples": table(lost[["path", "status", "reason", "reason_detail"]], limit=50),
            "class_counts": counts_table(class_counts, "label", "images"),
            "mean_confidence": figure(predicted["confidence"].mean() if len(predicted) else None),
            "model_id": model_id,
            "runtime_sha256": figures.get("runtime_sha256"),
            "images_per_second": figures.get("images_per_second"),
            "decode_seconds": figures.get("decode_seconds"),
            "predict_seconds": figures.get("predict_seconds"),
            "reused_predictions": reused,
            "fingerprint": batch.fingerprint,
            "labels_fingerprint": batch.labels_fingerprint,
            "accuracy": figure(accuracy),
            "labelled_images": labelled,
            "labels_status": json_value(labels.summary() if labels is not None else None),
            **_plot(lambda: confidence_histogram_png(predicted["confidence"].to_numpy()), "confidence_histogram", context.log),
            "uri": artifact(storage.uri(predictions_key(batch_id))),
            "dagster/row_count": len(frame),
            "dagster/partition_row_count": len(frame),
        }),
        data_version=DataVersion(f"{batch.fingerprint}:{model_id}"),
        check_results=[
            AssetCheckResult(
                check_name=CHECK_PREDICTIONS, passed=len(predicted) > 0, metadata=safe_metadata({"batch_id": batch_id, "images": len(predicted)})
            )
        ],
    )


# --------------------------------------------------------------------------- drift_report


class DriftReportConfig(Config):
    """Thresholds of the drift tests (defaults documented in cvops_dagster.monitoring.drift.DriftConfig)."""

    alpha: float = Field(default=0.05, description="family-wise false-alarm rate (Holm-Bonferroni); drift when score >= 1 - alpha")
    permutations: int = Field(default=1000, description="permutations of the embedding MMD test")
    outlier_quantile: float = Field(default=0.99, description="outlier: farther than this quantile of the reference's kNN distances")
    min_batch: int = Field(default=30, description="smallest batch that gets a verdict")
    seed: int = 0


@asset(
    deps=["batch_predictions"],
    partitions_def=production_batches,
    group_name="monitoring",
    kinds={"python", "scipy"},
    code_version="1",
    owners=ASSET_OWNERS,
    check_specs=[
        AssetCheckSpec(
            CHECK_DRIFT,
            asset="drift_report",
            description="The batch is within the drift threshold (WARN: drift shows here without failing the run; "
            "drift_retrain_sensor reacts to it).",
        )
    ],
    description="The batch against the served model's reference (its own validation + test data, cached per model): "
    "KS per image feature, MMD on embeddings (permutation p-value), chi-square on predicted classes, KS on "
    "confidences, kNN outlier share; one verdict with the family-wise false-alarm rate held by Holm-Bonferroni.",
)
def drift_report(context: AssetExecutionContext, config: DriftReportConfig, artifact_store: ArtifactStore) -> MaterializeResult:
    import numpy as np

    from cvops_dagster.monitoring.drift import DriftConfig, DriftSample
    from cvops_dagster.monitoring.drift import drift_report as run_drift_report
    from cvops_dagster.monitoring.plots import class_bars_png, embedding_projection_png, feature_histograms_png
    from cvops_dagster.monitoring.predictions import drift_inputs, read_predictions
    from cvops_dagster.monitoring.reference import load_or_build_reference
    from cvops_dagster.serving.pointer import local_copy
    from cvops_dagster.serving.predictor import Predictor

    storage, batch_id = artifact_store.storage, context.partition_key
    predictions = _latest_partition_metadata(context, "batch_predictions", batch_id)
    frame = read_predictions(storage, batch_id)
    if predictions is None or frame is None:
        raise ValueError(f"production batch {batch_id} has no batch_predictions yet; materialize batch_predictions first")
    model_id = str(predictions.get("model_id"))
    runtime_key = frame["runtime_sha256"].dropna()
    drift_config = DriftConfig(
        alpha=config.alpha, permutations=config.permutations, outlier_quantile=config.outlier_quantile,
        min_batch=config.min_batch, seed=config.seed,
    )  # fmt: skip
    predictor = _predictor_for(storage, model_id, str(runtime_key.iloc[0]) if len(runtime_key) else None, local_copy, Predictor)
    cached = load_or_build_reference(storage, predictor, drift_config)
    reference = cached.reference
    features, embeddings, classes, confidences = drift_inputs(frame)
    report = run_drift_report(reference, DriftSample(features, embeddings, classes, confidences), drift_config)
    event = drift_event_id(batch_id, str(predictions.get("fingerprint")), model_id)
    report_key = f"monitoring/drift/{batch_id}.json"
    document = {**report.to_dict(), "batch_id": batch_id, "model_id": model_id, "event": event, "reference": cached.key}
    storage.write_json(report_key, document)
    top = [f.name for f in report.top_features]
    context.log.info(f"batch {batch_id}: {report.verdict} (score {report.score}, threshold {report.threshold})")
    test_rows = [
        {"test": name, "statistic": t.statistic, "p_value": t.p_value, "p_adjusted": t.p_adjusted, "drift": t.drift}
        for name, t in report.tests.items()
    ]
    return MaterializeResult(
        metadata=safe_metadata({
            "drift": report.drift,
            "verdict": report.verdict,
            "score": figure(report.score),
            "threshold": figure(report.threshold),
            "model_id": model_id,
            "event": event,
            "fingerprint": predictions.get("fingerprint"),
            "images": report.n_batch,
            "reference_images": report.n_reference,
            "reference": artifact(storage.uri(cached.key)),
            "reference_built": cached.built,
            "tests": records_table(test_rows, {"test": STRING, "statistic": FLOAT, "p_value": FLOAT, "p_adjusted": FLOAT, "drift": BOOL}),
            "top_features": records_table(
                [f.__dict__ for f in report.top_features],
                {"name": STRING, "statistic": FLOAT, "p_value": FLOAT, "reference_mean": FLOAT, "batch_mean": FLOAT},
            ),
            "method": report.method,
            "notes": json_value(report.notes),
            **_plot(lambda: feature_histograms_png(reference.features, features, top, {f.name: f.statistic for f in report.top_features}),
                    "most_moved_features", context.log),  # fmt: skip
            **_plot(lambda: embedding_projection_png(reference.embeddings, embeddings), "embedding_projection", context.log),
            **_plot(lambda: class_bars_png(reference.labels, reference.class_counts, np.bincount(classes, minlength=len(reference.labels))),
                    "predicted_classes", context.log),  # fmt: skip
            "uri": artifact(storage.uri(report_key)),
            "inputs": {"batch_predictions": {"run_id": predictions.get("run_id"), "model_id": model_id}},
        }),
        data_version=DataVersion(f"{event}:{report.verdict}"),
        check_results=[
            AssetCheckResult(
                check_name=CHECK_DRIFT,
                passed=not report.drift,
                severity=AssetCheckSeverity.WARN,
                metadata=safe_metadata({
                    "batch_id": batch_id, "score": figure(report.score), "threshold": figure(report.threshold),
                    "verdict": report.verdict,
                }),  # fmt: skip
            )
        ],
    )


def _predictor_for(storage, model_id: str, runtime_sha256: str | None, local_copy, predictor_type):  # noqa: ANN001, ANN202
    """A predictor on the runtime that predicted the batch (pinned by the hash its rows record),
    so the reference goes through the same graph as the batch even after a new champion."""
    from cvops_dagster.registry.history import replay_history

    for event in reversed(replay_history(storage).applied):
        runtime = event.get("runtime") or {}
        if event.get("model_id") == model_id and runtime.get("fp32_sha256") == runtime_sha256 and runtime.get("fp32_key"):
            with local_copy(storage, runtime["fp32_key"]) as path:
                return predictor_type(path, expected_sha256=runtime_sha256, published=True)
    raise ValueError(f"no published runtime of model {model_id} with sha256 {runtime_sha256} in the production history")


# --------------------------------------------------------------------------- review_feedback


class ReviewFeedbackConfig(Config):
    precedence: list[str] = Field(
        default=["fiftyone", "delayed_labels"], description="label sources in order of authority: the first wins a disagreement"
    )


@asset(
    deps=["batch_predictions", "edge_case_review"],
    group_name="monitoring",
    kinds={"python", "parquet"},
    code_version="1",
    owners=ASSET_OWNERS,
    description="Every labelled production image from every label source (the FiftyOne review: samples tagged "
    "`reviewed` with a `ground_truth`; delayed `labels.csv` files), one label each, content-addressed, with its "
    "source batch and label source; a review beats a delayed label, recorded. Reviews of test-split images become "
    "relabel decisions and `discard` tags discard decisions, which the next cleaned_dataset version applies as "
    "recorded overrides and quarantine (`review_discard`). Refused labels are quarantined with their reason. Also "
    "the realised accuracy of the model that served each labelled batch, plotted over batches.",
)
def review_feedback(
    context: AssetExecutionContext,
    config: ReviewFeedbackConfig,
    image_source: ImageSource,
    artifact_store: ArtifactStore,
    fiftyone: FiftyOneConnection,
) -> MaterializeResult:
    from cvops_dagster.monitoring.feedback import (
        DelayedLabelsSource,
        collect_feedback,
        decisions_key,
        feedback_key,
        write_feedback,
    )
    from cvops_dagster.monitoring.plots import accuracy_over_batches_png
    from cvops_dagster.monitoring.predictions import read_predictions
    from cvops_dagster.training.model_store import load_card

    storage = artifact_store.storage
    batches = sorted(context.instance.get_materialized_partitions(AssetKey("batch_predictions")))
    label_sets: dict[str, tuple[str, ...]] = {}
    for batch_id in batches:
        frame = read_predictions(storage, batch_id)
        for model_id in set(frame["model_id"].dropna().astype(str)) if frame is not None else ():
            if model_id not in label_sets:
                label_sets[model_id] = tuple(load_card(storage, model_id)["labels"])
    accuracy = [(b, (_latest_partition_metadata(context, "batch_predictions", b) or {}).get("accuracy")) for b in batches]
    sources: list = [DelayedLabelsSource(image_source.landing(), storage, tuple(batches), label_sets)]
    # The FiftyOne review exists once edge_case_review made it: only then is MongoDB started.
    if context.instance.get_latest_materialization_event(AssetKey("edge_case_review")) is not None:
        from cvops_dagster.review.reviews import FiftyOneReviewSource

        fiftyone.connect()
        served = sorted({label for labels in label_sets.values() for label in labels})
        sources.insert(0, FiftyOneReviewSource(fiftyone.dataset_name, tuple(served)))
    feedback = collect_feedback(sources, precedence=config.precedence)
    key = write_feedback(storage, feedback)
    context.log.info(f"review feedback {feedback.version}: {feedback.labelled_samples} labelled images from {feedback.batches}")
    return MaterializeResult(
        metadata=safe_metadata({
            "version": feedback.version,
            "labelled_samples": feedback.labelled_samples,
            "sources": counts_table(feedback.sources(), "source", "images"),
            "batches": json_value(feedback.batches),
            "quarantined": len(feedback.quarantined),
            "quarantine_reasons": counts_table(feedback.quarantined["reason"].value_counts().to_dict(), "reason", "labels"),
            "quarantine_examples": table(feedback.quarantined, limit=50),
            "overrides": records_table(
                feedback.overrides,
                {"sample_id": STRING, "label": STRING, "source": STRING, "overridden_label": STRING, "overridden_source": STRING},
                limit=100,
            ),
            "realised_accuracy": records_table(
                [{"batch_id": b, "accuracy": a} for b, a in accuracy], {"batch_id": STRING, "accuracy": FLOAT}
            ),
            **_plot(lambda: accuracy_over_batches_png(accuracy), "realised_accuracy_over_batches", context.log),
            "review_decisions": len(feedback.decisions),
            "decisions": counts_table(feedback.decision_counts(), "action", "images", by_count=False),
            "decision_examples": table(feedback.decisions, limit=50),
            "decisions_key": decisions_key(feedback.version) if len(feedback.decisions) else None,
            "manifest_key": feedback_key(feedback.version),
            "uri": artifact(storage.uri(key)),
            "dagster/row_count": feedback.labelled_samples,
        }),
        data_version=DataVersion(feedback.version),
    )

