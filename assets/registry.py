"""production_model: the champion gate between trained challengers and what is served.

The registry modules (torch, for scoring both models on the current test split) are imported
inside the asset body, so loading the code location stays light (see assets/training.py).
"""

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, Config, MaterializeResult, asset
from pydantic import Field

from assets.automation import ON_UPSTREAM_UPDATE
from assets.metadata import safe_metadata, table, upstream
from resources.storage import ArtifactStore

CHECK_NO_REGRESSION = "check_production_model_no_regression"


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

    trained = upstream(context, "trained_model")
    challenger = trained.figure("model_id")
    version = trained.figure("dataset_version")
    before = current_champion(artifact_store.storage)
    decision = promote_if_better(artifact_store.storage, challenger, version, PromotionConfig(margin=config.margin))
    summary = decision.summary
    # Production accuracy on the current test split, against what the outgoing champion scored
    # when it was promoted: catches a champion that got worse on newer data, and a broken one.
    production_acc = decision.challenger_accuracy if decision.promoted else decision.champion_accuracy
    previous = before["test_accuracy"] if before else None
    history = promotion_history(artifact_store.storage)
    return MaterializeResult(
        metadata=safe_metadata({
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
        }),
        check_results=[
            AssetCheckResult(
                check_name=CHECK_NO_REGRESSION,
                passed=previous is None
                or (production_acc is not None and production_acc >= previous - config.regression_tolerance),
                metadata=safe_metadata({"recorded_before": previous, "after": production_acc, "tolerance": config.regression_tolerance}),
            )
        ],
    )


def _history_frame(history):  # noqa: ANN001, ANN202
    import pandas as pd

    rows = [
        {k: e.get(k) for k in ("at", "event", "model_id", "champion_id", "dataset_version", "reason")} for e in reversed(history)
    ]
    return pd.DataFrame(rows, columns=["at", "event", "model_id", "champion_id", "dataset_version", "reason"])
