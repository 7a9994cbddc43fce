"""hpo_study and trained_model: from a dataset version to a trained challenger.

The modules behind these assets (torch, Lightning, Optuna) are imported inside the asset
bodies: loading the code location then stays light (~0.3 GB and ~5 s less), which every
run's step processes and the cleaning workers forked from them feel.
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.automation import ON_UPSTREAM_UPDATE
from assets.metadata import (
    ASSET_OWNERS,
    artifact,
    counts_table,
    figure,
    json_value,
    per_class_table,
    png_markdown,
    safe_metadata,
    table,
    upstream,
)
from cvops_dagster.core.settings import params_digest, step_threads
from resources.deployment import training_op_tags
from resources.storage import ArtifactStore
from resources.tuning import OptunaStorage

CHECK_ACCURACY_FLOOR = "check_trained_model_accuracy_floor"


class HpoStudyConfig(Config):
    """Budget of the hyperparameter search."""

    n_trials: int = Field(default=8, description="finished trials wanted in the study (earlier runs count)")
    timeout_s: float | None = Field(default=None, description="seconds this run may spend searching")
    max_epochs: int = Field(default=12, description="epochs per trial (the pruner's resource)")
    seed: int = 0
    skip: bool = Field(default=False, description="skip the search; training then uses the documented defaults")
    torch_threads: int | None = Field(
        default=None,
        description="torch threads for the trials, shared by the workers (default: the CPUs this process may use)",
    )
    hpo_workers: int = Field(
        default=1,
        ge=1,
        description="worker processes running trials at once on the study's storage, each with its share of "
        "torch_threads; 1 runs in the step's process and is reproducible for a seed. Trials a crashed worker "
        "left running are then found by heartbeat (database storages: the default SQLite file, PostgreSQL)",
    )


@asset(
    deps=["cleaned_dataset"],
    group_name="training",
    kinds={"optuna", "pytorch"},
    pool="training",
    op_tags=training_op_tags(),
    code_version="1",
    owners=ASSET_OWNERS,
    automation_condition=ON_UPSTREAM_UPDATE,
    description="An Optuna study per dataset version (seeded TPE, successive halving fed by Lightning), "
    "persisted so a re-run resumes it.",
)
def hpo_study(
    context: AssetExecutionContext, config: HpoStudyConfig, artifact_store: ArtifactStore, optuna_storage: OptunaStorage
) -> MaterializeResult:
    from cvops_dagster.training.tuning import StudyConfig, run_study, study_storage_uri  # torch, Optuna: see the module docstring

    dataset = upstream(context, "cleaned_dataset")
    version = dataset.figure("version")
    inputs = {"cleaned_dataset": dataset.reference("version")}
    if config.skip:
        return MaterializeResult(
            metadata=safe_metadata(
                {"dataset_version": version, "skipped": True, "best_params": json_value(None), "inputs": inputs}
            ),
            data_version=DataVersion(f"{version}:defaults"),
        )
    url = optuna_storage.url
    study_config = StudyConfig(
        n_trials=config.n_trials,
        timeout=config.timeout_s,
        max_epochs=config.max_epochs,
        seed=config.seed,
        # Embedded SQLite is this step's alone: with one worker, trials it finds RUNNING are crash
        # leftovers. A shared database, or several workers, may hold live trials: heartbeats decide.
        single_worker=url is None or url.startswith("sqlite"),
        num_threads=step_threads(config.torch_threads),
        workers=config.hpo_workers,
    )
    result = run_study(artifact_store.storage, version, study_config, url)
    columns = [c for c in ("number", "state", "value", "epochs", "worker") if c in result.trials.columns]
    columns += [c for c in result.trials.columns if c.startswith("params_")]
    return MaterializeResult(
        metadata=safe_metadata({
            "dataset_version": version,
            "skipped": False,
            "study_name": result.study_name,
            "best_params": json_value(result.best_params),
            "best_value": figure(result.best_value),
            "trials_complete": result.n_complete,
            "trials_pruned": result.n_pruned,
            "trials_failed": result.n_failed,
            "trials_this_run": result.n_trials_this_run,
            "epochs_consumed": result.epochs_consumed,
            "trials": table(result.trials[columns], limit=100),
            "optimization_history": png_markdown(result.history_png, "optimization history"),
            "uri": artifact(study_storage_uri(artifact_store.storage, url)),
            "torch_threads": study_config.num_threads,
            "hpo_workers": result.workers,
            "trials_per_worker": counts_table(result.trials_per_worker, "worker", "trials", by_count=False),
            "inputs": inputs,
        }),
        data_version=DataVersion(f"{result.study_name}:{params_digest(result.best_params)}"),
    )


class TrainedModelConfig(Config):
    """How the final model trains and the floor it must reach."""

    max_epochs: int = 40
    patience: int = 15
    seed: int = 0
    accuracy_floor: float = Field(default=0.9, description="test accuracy the model must reach to be considered")
    torch_threads: int | None = Field(
        default=None, description="torch threads for training (default: the CPUs this process may use)"
    )


@asset(
    deps=["cleaned_dataset", "hpo_study"],
    group_name="training",
    kinds={"pytorch", "safetensors"},
    pool="training",
    op_tags=training_op_tags(),
    code_version="1",
    owners=ASSET_OWNERS,
    automation_condition=ON_UPSTREAM_UPDATE,
    check_specs=[
        AssetCheckSpec(
            CHECK_ACCURACY_FLOOR,
            asset="trained_model",
            blocking=True,
            description="Test accuracy reaches the floor and beats chance; a failure stops promotion.",
        )
    ],
    description="A Lightning-trained classifier (best study params), safetensors + model card, with test "
    "metrics beside a scikit-learn baseline on the same split.",
)
def trained_model(
    context: AssetExecutionContext, config: TrainedModelConfig, artifact_store: ArtifactStore
) -> MaterializeResult:
    from cvops_dagster.training.train import TrainConfig, train_model

    dataset = upstream(context, "cleaned_dataset")
    study = upstream(context, "hpo_study")
    version = dataset.figure("version")
    if study.figure("dataset_version") != version:
        raise ValueError(
            f"hpo_study (run {study.run_id}) was tuned on dataset {study.figure('dataset_version')}, but the "
            f"cleaned_dataset this run builds on is {version}: materialize hpo_study for {version} first"
        )
    params = study.figure("best_params")
    train_config = TrainConfig(
        max_epochs=config.max_epochs, patience=config.patience, seed=config.seed, num_threads=step_threads(config.torch_threads)
    )
    result = train_model(artifact_store.storage, version, params, train_config)
    chance = 1.0 / max(len(result.card["labels"]), 1)
    floor_ok = result.test_accuracy >= config.accuracy_floor and result.test_accuracy > chance
    return MaterializeResult(
        metadata=safe_metadata({
            "model_id": result.model_id,
            "dataset_version": version,
            "test_accuracy": figure(result.test_accuracy),
            "macro_f1": figure(result.macro_f1),
            "baseline_accuracy": figure(result.baseline_accuracy),
            "baseline_macro_f1": figure(result.baseline_macro_f1),
            "best_val_accuracy": figure(result.best_val_accuracy),
            "epochs_trained": result.epochs_trained,
            "resumed_from_epoch": result.resumed_from_epoch,
            "train_seconds": figure(result.train_seconds),
            "accepted": floor_ok,
            "params": json_value(result.params),
            "per_class": per_class_table(result.per_class),
            "confusion_matrix": png_markdown(result.confusion_matrix_png, "confusion matrix"),
            "learning_curves": png_markdown(result.learning_curves_png, "learning curves"),
            "model_card": MetadataValue.path(artifact_store.uri(result.model_card_key)),
            "uri": artifact(artifact_store.uri(result.weights_key)),
            "reused": result.reused,
            "torch_threads": train_config.num_threads,
            "inputs": {
                "cleaned_dataset": dataset.reference("version"),
                "hpo_study": study.reference("study_name", "dataset_version"),
            },
        }),
        data_version=DataVersion(result.model_id),
        check_results=[
            AssetCheckResult(
                check_name=CHECK_ACCURACY_FLOOR,
                passed=floor_ok,
                metadata=safe_metadata(
                    {"test_accuracy": figure(result.test_accuracy), "floor": config.accuracy_floor, "chance": figure(chance)}
                ),
            )
        ],
    )
