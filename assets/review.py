"""edge_case_review: the production stream and the served model's test split in FiftyOne.

After every production batch's predictions, the persistent review dataset is brought up to
date: one sample per predicted production image and per test-split image (an upsert),
FiftyOne Brain runs on the runtime's own embeddings and logits, and the saved views a reviewer
starts from (``edge_cases``, ``likely_mislabeled``, ``near_duplicates``, ``drift_<batch>``).
Reviews written in the App are read back by ``review_feedback`` (its ``fiftyone`` source).

FiftyOne loads inside the asset body: importing it starts nothing, but it is heavy, and the
code location must load fast.
"""

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.metadata import (
    ASSET_OWNERS,
    FLOAT,
    STRING,
    counts_table,
    json_value,
    png_markdown,
    records_table,
    safe_metadata,
    upstream,
)
from assets.monitoring import _latest_partition_metadata
from resources.review import FiftyOneConnection
from resources.storage import ArtifactStore

APP_COMMAND = "cvops review --view edge_cases"


class EdgeCaseReviewConfig(Config):
    """Sizes of the saved views and settings of the Brain runs."""

    edge_cases_per_criterion: int = Field(
        default=25, description="production samples each edge-case criterion adds to `edge_cases` (lowest confidence, "
        "hardest, most unique, farthest from the test split)",
    )  # fmt: skip
    mislabeled_top: int = Field(default=50, description="samples in `likely_mislabeled` (highest mistakenness first)")
    near_duplicate_distance: float = Field(
        default=0.01, description="cosine distance between embeddings under which two samples are near duplicates"
    )
    visualization_method: str = Field(default="pca", description='embeddings map method: "pca" or "tsne" (UMAP is not installed)')
    test_split: bool = Field(default=True, description="add the served model's test split (with ground truth) as a tagged group")


@asset(
    deps=["batch_predictions", "drift_report"],
    group_name="monitoring",
    kinds={"fiftyone", "python"},
    code_version="1",
    owners=ASSET_OWNERS,
    # One build at a time: two production runs would upsert the same samples concurrently.
    pool="review",
    description="The FiftyOne review dataset: every predicted production image and the served model's test split "
    "(upserted by content id), Brain runs keyed by model id (uniqueness, hardness, mistakenness, similarity with near "
    "duplicates, a PCA map of the embeddings) and saved views: edge_cases, likely_mislabeled, near_duplicates and one "
    f"per drifted batch. Open it with `{APP_COMMAND}`.",
)
def edge_case_review(
    context: AssetExecutionContext, config: EdgeCaseReviewConfig, artifact_store: ArtifactStore, fiftyone: FiftyOneConnection
) -> MaterializeResult:
    from cvops_dagster.review.brain import BrainConfig
    from cvops_dagster.review.build import build_review, review_rows
    from cvops_dagster.review.views import ViewConfig
    from cvops_dagster.serving.pointer import open_production_predictor

    storage = artifact_store.storage
    batches = sorted(context.instance.get_materialized_partitions(AssetKey("batch_predictions")))
    drifted = {b: bool((_latest_partition_metadata(context, "drift_report", b) or {}).get("drift")) for b in batches}
    predictor = None
    try:
        predictor = open_production_predictor(storage)
    except FileNotFoundError as exc:
        context.log.warning(f"no served runtime ({exc}): the review dataset gets no test split this time")
    if not config.test_split:
        predictor = None
    rows = review_rows(storage, batches, drifted, predictor, _known_labels(context, storage))
    if not len(rows):
        raise ValueError("nothing to review: no production batch has predicted images yet, and no runtime is served")
    model_id = predictor.metadata.model_id if predictor is not None else str(rows["model_id"].iloc[-1])
    dataset = fiftyone.dataset(create=True)
    build = build_review(
        dataset, rows, fiftyone.media(storage), model_id, [b for b, flag in drifted.items() if flag],
        BrainConfig(near_duplicate_distance=config.near_duplicate_distance, visualization_method=config.visualization_method),
        ViewConfig(edge_cases_per_criterion=config.edge_cases_per_criterion, mislabeled_top=config.mislabeled_top),
        labels=list(predictor.labels) if predictor is not None else sorted(set(rows["predicted_label"].astype(str))),
    )  # fmt: skip
    context.log.info(
        f"review dataset {build.dataset}: {build.samples} samples ({build.upsert.added} added, {build.upsert.updated} "
        f"updated, {build.upsert.removed} removed); views {build.views}"
    )
    preview = {}
    if build.preview_png is not None:
        preview["edge_case_preview"] = png_markdown(build.preview_png, "top edge cases", f"Open them in the App: `{APP_COMMAND}`")
        preview["edge_case_table"] = records_table(
            build.preview_rows,
            {"file": STRING, "batch": STRING, "predicted": STRING, "confidence": FLOAT, "reasons": STRING},
        )
    return MaterializeResult(
        metadata=safe_metadata({
            "dataset": build.dataset,
            "samples": build.samples,
            "production_samples": build.production,
            "test_split_samples": build.test_split,
            "added": build.upsert.added,
            "updated": build.upsert.updated,
            "removed": build.upsert.removed,
            "views": counts_table(build.views, "view", "samples", by_count=False),
            "view_counts": json_value(build.views),
            "brain_runs": json_value(sorted(build.brain.keys.values())),
            "brain_skipped": json_value(build.brain.skipped),
            "brain_seconds": counts_table(build.brain.seconds, "run", "seconds", by_count=False),
            "edge_case_criteria": counts_table(build.edge_criteria, "criterion", "samples", by_count=False),
            "near_duplicates": build.brain.near_duplicates,
            "model_id": model_id,
            "drifted_batches": json_value([b for b, flag in drifted.items() if flag]),
            "app_command": APP_COMMAND,
            "app": MetadataValue.md(
                f"Open the edge cases in the FiftyOne App:\n\n```\n{APP_COMMAND}\n```\n\n"
                "Review protocol: set `ground_truth` on a sample and tag it `reviewed`; tag `discard` to keep an image "
                "out of training. `review_feedback` reads them back."
            ),
            "database": fiftyone.describe(),
            "media_folder": fiftyone.media(storage).root.as_posix(),
            "media_downloaded": build.media_downloaded,
            "seconds": counts_table(build.seconds, "phase", "seconds", by_count=False),
            **preview,
            "dagster/row_count": build.samples,
        }),
    )


def _known_labels(context: AssetExecutionContext, storage) -> dict[str, str]:  # noqa: ANN001
    """Sample id -> label of the labelled production images the latest review_feedback holds."""
    try:
        feedback = upstream(context, "review_feedback")
    except ValueError:
        return {}
    key = feedback.figure("manifest_key") if feedback is not None else None
    if not key or not storage.exists(key):
        return {}
    frame = storage.read_parquet(key)
    return dict(zip(frame["sample_id"].astype(str), frame["label"].astype(str), strict=True))
