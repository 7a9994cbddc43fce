"""hpo_study, trained_model and production_model: from a dataset version to a champion.

The modules behind these assets (torch, Lightning, Optuna) are imported inside the asset
bodies: loading the code location then stays light (~0.3 GB and ~5 s less), which every
run's step processes and the cleaning workers forked from them feel.
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.automation import ON_UPSTREAM_UPDATE
from assets.metadata import json_value, latest_figure, png_markdown, table
from resources.storage import ArtifactStore
from resources.tuning import OptunaStorage

CHECK_ACCURACY_FLOOR = "check_trained_model_accuracy_floor"
CHECK_NO_REGRESSION = "check_production_model_no_regression"


class HpoStudyConfig(Config):
    """Budget of the hyperparameter search."""

    n_trials: int = Field(default=8, description="finished trials wanted in the study (earlier runs count)")
    timeout_s: float | None = Field(default=None, description="seconds this run may spend searching")
    max_epochs: int = Field(default=12, description="epochs per trial (the pruner's resource)")
    seed: int = 0
    skip: bool = Field(default=False, description="skip the search; training then uses the documented defaults")


@asset(
    deps=["cleaned_dataset"],
    group_name="training",
    kinds={"optuna", "pytorch"},
    pool="training",
    code_version="1",
    automation_condition=ON_UPSTREAM_UPDATE,
    description="An Optuna study per dataset version (seeded TPE, successive halving fed by Lightning), "
    "persisted so a re-run resumes it.",
)
def hpo_study(
    context: AssetExecutionContext, config: HpoStudyConfig, artifact_store: ArtifactStore, optuna_storage: OptunaStorage
) -> MaterializeResult:
    from cvops_dagster.training.tuning import StudyConfig, run_study  # torch and Optuna: see the module docstring

    version = latest_figure(context, "cleaned_dataset", "version")
    if config.skip:
        return MaterializeResult(metadata={"dataset_version": version, "skipped": True, "best_params": json_value(None)})
    url = optuna_storage.url
    study_config = StudyConfig(
        n_trials=config.n_trials,
        timeout=config.timeout_s,
        max_epochs=config.max_epochs,
        seed=config.seed,
        # Embedded SQLite is one worker: trials it finds RUNNING are crash leftovers. A shared
        # database may hold other workers' live trials: those are found stale by heartbeat.
        single_worker=url is None or url.startswith("sqlite"),
    )
    result = run_study(artifact_store.storage, version, study_config, url)
    columns = [c for c in result.trials.columns if c in ("number", "state", "value", "epochs") or c.startswith("params_")]
    return MaterializeResult(
        metadata={
            "dataset_version": version,
            "skipped": False,
            "study_name": result.study_name,
            "best_params": json_value(result.best_params),
            "best_value": result.best_value,
            "trials_complete": result.n_complete,
            "trials_pruned": result.n_pruned,
            "trials_failed": result.n_failed,
            "trials_this_run": result.n_trials_this_run,
            "epochs_consumed": result.epochs_consumed,
            "trials": table(result.trials[columns], limit=100),
            "optimization_history": png_markdown(result.history_png, "optimization history"),
        }
    )


class TrainedModelConfig(Config):
    """How the final model trains and the floor it must reach."""

    max_epochs: int = 40
    patience: int = 15
    seed: int = 0
    accuracy_floor: float = Field(default=0.9, description="test accuracy the model must reach to be considered")


@asset(
    deps=["cleaned_dataset", "hpo_study"],
    group_name="training",
    kinds={"pytorch", "safetensors"},
    pool="training",
    code_version="1",
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

    version = latest_figure(context, "cleaned_dataset", "version")
    params = latest_figure(context, "hpo_study", "best_params")
    train_config = TrainConfig(max_epochs=config.max_epochs, patience=config.patience, seed=config.seed)
    result = train_model(artifact_store.storage, version, params, train_config)
    chance = 1.0 / max(len(result.card["labels"]), 1)
    floor_ok = result.test_accuracy >= config.accuracy_floor and result.test_accuracy > chance
    return MaterializeResult(
        metadata={
            "model_id": result.model_id,
            "dataset_version": version,
            "test_accuracy": result.test_accuracy,
            "macro_f1": result.macro_f1,
            "baseline_accuracy": result.baseline_accuracy,
            "baseline_macro_f1": result.baseline_macro_f1,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs_trained": result.epochs_trained,
            "resumed_from_epoch": result.resumed_from_epoch,
            "train_seconds": result.train_seconds,
            "accepted": floor_ok,
            "params": json_value(result.params),
            "per_class": json_value(result.per_class),
            "confusion_matrix": png_markdown(result.confusion_matrix_png, "confusion matrix"),
            "learning_curves": png_markdown(result.learning_curves_png, "learning curves"),
            "model_card": MetadataValue.path(artifact_store.uri(result.model_card_key)),
        },
        check_results=[
            AssetCheckResult(
                check_name=CHECK_ACCURACY_FLOOR,
                passed=floor_ok,
                metadata={"test_accuracy": result.test_accuracy, "floor": config.accuracy_floor, "chance": chance},
            )
        ],
    )


class ProductionModelConfig(Config):
    margin: float = Field(default=0.0, description="accuracy the challenger must gain over the champion")
    regression_tolerance: float = Field(
        default=0.01, description="how far production accuracy may fall below the outgoing champion's recorded one"
    )


@asset(
    deps=["trained_model"],
    group_name="training",
    kinds={"python"},
    code_version="1",
    automation_condition=ON_UPSTREAM_UPDATE,
    check_specs=[
        AssetCheckSpec(
            CHECK_NO_REGRESSION,
            asset="production_model",
            blocking=True,
            description="The champion after the gate scores no worse than the one before, on the same test split.",
        )
    ],
    description="The champion gate: the challenger replaces the champion only when it beats it on the current "
    "test split by the margin. History in production/history.json; `cvops rollback` restores the previous one.",
)
def production_model(
    context: AssetExecutionContext, config: ProductionModelConfig, artifact_store: ArtifactStore
) -> MaterializeResult:
    from cvops_dagster.registry.promotion import PromotionConfig, current_champion, promote_if_better, promotion_history

    challenger = latest_figure(context, "trained_model", "model_id")
    version = latest_figure(context, "trained_model", "dataset_version")
    before = current_champion(artifact_store.storage)
    decision = promote_if_better(artifact_store.storage, challenger, version, PromotionConfig(margin=config.margin))
    summary = decision.summary
    # Production accuracy on the current test split, against what the outgoing champion scored
    # when it was promoted: catches a champion that got worse on newer data, and a broken one.
    production_acc = decision.challenger_accuracy if decision.promoted else decision.champion_accuracy
    previous = before["test_accuracy"] if before else None
    history = promotion_history(artifact_store.storage)
    return MaterializeResult(
        metadata={
            "model_id": summary["model_id"],
            "test_accuracy": summary["test_accuracy"],
            "promoted_at": summary["promoted_at"],
            "dataset_version": summary["dataset_version"],
            "promoted": decision.promoted,
            "reason": decision.reason,
            "challenger_id": decision.challenger_id,
            "challenger_accuracy": decision.challenger_accuracy,
            "champion_accuracy_before": decision.champion_accuracy,
            "history": table(_history_frame(history), limit=50),
        },
        check_results=[
            AssetCheckResult(
                check_name=CHECK_NO_REGRESSION,
                passed=previous is None
                or (production_acc is not None and production_acc >= previous - config.regression_tolerance),
                metadata={"recorded_before": previous, "after": production_acc, "tolerance": config.regression_tolerance},
            )
        ],
    )


def _history_frame(history):  # noqa: ANN001, ANN202
    import pandas as pd

    rows = [
        {k: e.get(k) for k in ("at", "event", "model_id", "champion_id", "dataset_version", "reason")} for e in reversed(history)
    ]
    return pd.DataFrame(rows, columns=["at", "event", "model_id", "champion_id", "dataset_version", "reason"])
