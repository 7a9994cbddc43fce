"""The composition root: every asset, check, job, sensor and resource of the code location."""

from __future__ import annotations

import warnings
from pathlib import Path

from dagster import (
    AnchorBasedFilePathMapping,
    AssetSelection,
    BetaWarning,
    Definitions,
    define_asset_job,
    link_code_references_to_git,
    load_asset_checks_from_modules,
    load_assets_from_modules,
    with_source_code_references,
)

from cvops_dagster.core.settings import disable_telemetry

disable_telemetry()

import assets.datasets  # noqa: E402
import assets.ingestion  # noqa: E402
import assets.monitoring  # noqa: E402
import assets.registry  # noqa: E402
import assets.review  # noqa: E402
import assets.serving  # noqa: E402
import assets.training  # noqa: E402
from assets.partitions import image_batches  # noqa: E402
from cvops_dagster.core.settings import retrain_triggers  # noqa: E402
from resources.catalog import git_source_from_env  # noqa: E402
from resources.deployment import step_executor  # noqa: E402
from resources.review import fiftyone_from_env  # noqa: E402
from resources.storage import artifact_store_from_env, image_source_from_env, s3_from_env  # noqa: E402
from resources.tuning import optuna_storage_from_env  # noqa: E402
from sensors.automation import asset_update_sensor  # noqa: E402
from sensors.batches import image_batches_sensor  # noqa: E402
from sensors.production import production_batches_sensor  # noqa: E402
from sensors.retraining import drift_retrain_sensor  # noqa: E402
from sensors.review import review_sensor  # noqa: E402

ASSET_MODULES = [assets.ingestion, assets.datasets, assets.training, assets.registry, assets.serving, assets.monitoring, assets.review]
#: The repository root: code references are mapped to a git URL relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]

ingest_job = define_asset_job(
    "ingest_job",
    selection=AssetSelection.assets("raw_images"),
    description="Ingest one landing-zone batch (one image_batches partition).",
)

#: The production side: one run per production batch (a production_batches partition).
PRODUCTION_ASSETS = AssetSelection.assets("batch_predictions", "drift_report", "edge_case_review", "review_feedback")

lifecycle_job = define_asset_job(
    "lifecycle_job",
    selection=AssetSelection.all() - AssetSelection.assets("raw_images") - PRODUCTION_ASSETS,
    description="From the ingested batches and the labelled production images to a served runtime: dataset, "
    "study, model, gate, runtime. drift_retrain_sensor's retraining runs are runs of this job (tag cvops/trigger=drift).",
)

production_job = define_asset_job(
    "production_job",
    selection=PRODUCTION_ASSETS,
    description="One production batch (a production_batches partition): predictions by the served runtime, the "
    "drift report against the served model's reference, the FiftyOne review dataset (edge_case_review), and the "
    "labelled production images (review_feedback).",
)

#: What a new review in the FiftyOne App refreshes (review_sensor): the feedback, and the next
#: dataset version when new data may start a retraining (CVOPS_RETRAIN_ON includes new_data).
REVIEW_ASSETS = AssetSelection.assets("review_feedback") | (
    AssetSelection.assets("cleaned_dataset") if "new_data" in retrain_triggers() else AssetSelection.assets()
)

review_job = define_asset_job(
    "review_job",
    selection=REVIEW_ASSETS,
    description="Reviews made in the FiftyOne App: review_feedback reads them (tags reviewed/discard), and, when "
    "CVOPS_RETRAIN_ON includes new_data, cleaned_dataset makes the next dataset version with them. review_sensor runs it.",
)

rollback_job = define_asset_job(
    "rollback_job",
    selection=AssetSelection.assets("production_model", "onnx_runtime"),
    config={"ops": {"production_model": {"config": {"rollback": True}}}},
    description="Restore the previous champion: production_model decides the rollback, onnx_runtime publishes it "
    "with the restored model's runtime (reused when its files still verify, else rebuilt). `cvops rollback` runs it.",
)


def assets_with_code_references() -> list:
    """Every asset with a reference to the function that computes it (the UI links to it): the
    local file, or its page in the repository ``CVOPS_GIT_URL`` names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # code references are beta in Dagster 1.13
        defined = with_source_code_references(load_assets_from_modules(ASSET_MODULES))
        git = git_source_from_env()
        if git is not None:
            mapping = AnchorBasedFilePathMapping(local_file_anchor=REPO_ROOT, file_anchor_path_in_repository="")
            defined = link_code_references_to_git(defined, git_url=git.url, git_branch=git.branch, file_path_mapping=mapping)
    return list(defined)


def build_definitions() -> Definitions:
    # One S3 configuration for every Dagster-side S3 access: the resource itself (a boto3
    # client for any asset that asks for ``s3``) and the stores that move bytes with s3fs.
    s3 = s3_from_env()
    return Definitions(
        assets=assets_with_code_references(),
        asset_checks=load_asset_checks_from_modules(ASSET_MODULES),
        jobs=[ingest_job, lifecycle_job, production_job, review_job, rollback_job],
        executor=step_executor(),
        sensors=[image_batches_sensor, asset_update_sensor, production_batches_sensor, drift_retrain_sensor, review_sensor],
        resources={
            "s3": s3,
            "artifact_store": artifact_store_from_env(s3),
            "image_source": image_source_from_env(s3),
            "optuna_storage": optuna_storage_from_env(),
            "fiftyone": fiftyone_from_env(),
        },
    )


defs = build_definitions()
