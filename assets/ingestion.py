"""raw_images: one landing-zone batch copied into content-addressed storage."""


from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.metadata import ASSET_OWNERS, artifact, counts_table, parquet_table_metadata, safe_metadata, table
from assets.partitions import image_batches
from cvops_dagster.ingestion.ingest import ingest_batch
from resources.storage import ArtifactStore, ImageSource


@asset(
    partitions_def=image_batches,
    group_name="ingestion",
    kinds={"python", "parquet"},
    code_version="1",
    owners=ASSET_OWNERS,
    check_specs=[
        AssetCheckSpec(
            "check_raw_images_not_empty",
            asset="raw_images",
            description="The batch yielded at least one file for cleaning.",
        )
    ],
    description="A landing-zone batch, copied by content to `images/<sha256>.<ext>` with a Parquet manifest "
    "(`manifests/raw/<batch_id>.parquet`); rejected entries are recorded with their reason, never copied.",
)
def raw_images(
    context: AssetExecutionContext, image_source: ImageSource, artifact_store: ArtifactStore
) -> MaterializeResult:
    landing = image_source.landing()
    fingerprint = landing.fingerprint(context.partition_key)
    result = ingest_batch(landing, artifact_store.storage, context.partition_key)
    summary = result.summary()
    context.log.info(f"batch {result.batch_id}: {result.files} files, {result.rejected} rejected")
    return MaterializeResult(
        metadata=safe_metadata({
            "files": result.files,
            "fingerprint": fingerprint,
            "bytes": result.bytes_ingested,
            "rejected": result.rejected,
            "rejected_reasons": counts_table(summary["rejected_reasons"], "reason", "files"),
            "labels": counts_table(summary["labels"], "label", "files"),
            "manifest": MetadataValue.path(artifact_store.uri(result.manifest_key)),
            "uri": artifact(artifact_store.uri(result.manifest_key)),
            "content_version": result.content_version,
            "preview": table(result.manifest[["path", "label", "status", "reason", "size_bytes", "sample_id"]]),
            **parquet_table_metadata(result.manifest, len(result.manifest), partition=True),
        }),
        data_version=DataVersion(result.content_version),
        check_results=[
            AssetCheckResult(
                check_name="check_raw_images_not_empty",
                passed=result.files > 0,
                metadata=safe_metadata({"files": result.files, "rejected": result.rejected}),
            )
        ],
    )
