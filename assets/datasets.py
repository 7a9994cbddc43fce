"""cleaned_dataset: every ingested batch decoded, normalised, deduplicated, validated and split."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
import pandas as pd
from pydantic import Field

from assets.automation import dataset_automation
from assets.metadata import (
    ASSET_OWNERS,
    artifact,
    counts_table,
    dataset_overview,
    STRING,
    figure,
    json_value,
    records_table,
    parquet_table_metadata,
    upstream,
    safe_metadata,
    table,
)
from cvops_dagster.datasets.cleaning import CleaningConfig, clean_dataset
from cvops_dagster.ingestion.ingest import read_raw_manifests
from cvops_dagster.datasets.validation import ValidationConfig, validate_dataset
from resources.storage import ArtifactStore

CHECK_EXPECTATIONS = "check_cleaned_dataset_expectations"


class CleanedDatasetConfig(Config):
    """Run-time settings of cleaning and of the expectation suite."""

    workers: int | None = Field(default=None, description="decode worker processes (default: one per core)")
    mode: str | None = Field(default=None, description='force "L" or "RGB" instead of the colour-fraction rule')
    min_class_count: int = Field(default=5, description="clean samples every class needs")
    min_class_ratio: float = Field(default=0.2, description="smallest class over largest class")


@asset(
    deps=["raw_images", "review_feedback"],
    group_name="datasets",
    kinds={"python", "parquet", "great_expectations"},
    code_version="1",
    owners=ASSET_OWNERS,
    automation_condition=dataset_automation(),
    check_specs=[
        AssetCheckSpec(
            CHECK_EXPECTATIONS,
            asset="cleaned_dataset",
            blocking=True,
            description="Great Expectations suite over the image-metadata table; a failure stops training.",
        )
    ],
    description="One dataset version from every ingested batch and the labelled production images of review_feedback: safe decoding in worker processes, canonical "
    "PNGs, exact and near duplicates, quarantine with reasons, stable hash-based splits.",
)
def cleaned_dataset(
    context: AssetExecutionContext, config: CleanedDatasetConfig, artifact_store: ArtifactStore
) -> MaterializeResult:
    batches = sorted(context.instance.get_materialized_partitions(AssetKey("raw_images")))
    feedback = _review_feedback(context)
    raw = read_raw_manifests(artifact_store.storage, batch_ids=batches)
    decisions = None
    if feedback is not None:
        # loads ONNX Runtime: here, not at load
        from cvops_dagster.monitoring.feedback import read_feedback_records, read_review_decisions

        records = read_feedback_records(artifact_store.storage, feedback.figure("manifest_key"))
        raw = pd.concat([raw, records], ignore_index=True) if len(records) else raw
        decisions = read_review_decisions(artifact_store.storage, feedback.figure("decisions_key"))
    cleaning = CleaningConfig(mode=config.mode)
    result = clean_dataset(artifact_store.storage, raw, cleaning, workers=config.workers, review=decisions)
    review = result.dataset_info.get("review", {})
    report = validate_dataset(
        result.manifest,
        ValidationConfig(min_class_count=config.min_class_count, min_class_ratio=config.min_class_ratio),
    )
    summary = result.summary()
    context.log.info(f"dataset {result.version}: {summary['clean']} clean of {summary['input']}")
    failed = [
        {"expectation": r.expectation, "table": r.table, "column": r.column, "observed": r.observed_value, "examples": r.examples}
        for r in report.failed
    ]
    return MaterializeResult(
        metadata=safe_metadata({
            "version": result.version,
            "batches": json_value(batches),
            "review_feedback_version": feedback.figure("version") if feedback is not None else None,
            "review_feedback_samples": feedback.figure("labelled_samples") if feedback is not None else 0,
            "review_overrides": len(review.get("overrides", [])),
            "review_discards": int(review.get("discarded", 0)),
            "review_confirmed": int(review.get("confirmed", 0)),
            "review_override_examples": records_table(
                review.get("overrides", []),
                {"record_id": STRING, "old_label": STRING, "new_label": STRING, "source": STRING, "reviewed_at": STRING},
                limit=100,
            ),
            "inputs": {"review_feedback": feedback.reference("version") if feedback is not None else None},
            "input": summary["input"],
            "clean": summary["clean"],
            "duplicates": summary["duplicates"],
            "quarantined": summary["quarantined"],
            "quarantine_reasons": counts_table(summary["quarantine_reasons"], "reason", "files"),
            "splits": counts_table(summary["splits"], "split", "images", by_count=False),
            "classes": counts_table(summary["classes"], "label", "images", by_count=False),
            "mode": result.mode,
            "image_size": json_value(result.dataset_info.get("image_size")),
            "gx_success": report.success,
            "accepted": report.success,
            "gx_statistics": counts_table(report.statistics, "statistic", "value", by_count=False),
            "quarantine_examples": table(result.quarantine_examples, limit=50),
            **dataset_overview(artifact_store.storage, result.manifest, cleaning.decode, context.log),
            "manifest": MetadataValue.path(artifact_store.uri(result.manifest_key)),
            "uri": artifact(artifact_store.uri(result.manifest_key)),
            "dataset_json": artifact(artifact_store.uri(result.dataset_json_key)),
            **parquet_table_metadata(result.manifest_table, result.manifest_table.num_rows),
            "decode_seconds": figure(result.timings.get("decode_s", 0.0)),
            "files_decoded": result.cache.decoded,
            "files_from_decode_cache": result.cache.hits,
        }),
        data_version=DataVersion(result.version),
        check_results=[
            AssetCheckResult(
                check_name=CHECK_EXPECTATIONS,
                passed=report.success,
                severity=AssetCheckSeverity.ERROR,
                metadata=safe_metadata({
                    "evaluated": report.statistics["evaluated_expectations"],
                    "failed": len(report.failed),
                    "failing_expectations": json_value(failed),
                }),
            )
        ],
    )


def _review_feedback(context: AssetExecutionContext):  # noqa: ANN202 - an assets.metadata.Upstream or None
    """The review_feedback this version includes (this run's, else the latest), or ``None``
    before any production label was collected."""
    try:
        return upstream(context, "review_feedback")
    except ValueError:
        return None
