"""production_model: the champion gate. It decides which model should serve; it publishes nothing.

The decision (``production/decisions/<id>.json``) is published by ``onnx_runtime`` once every
check passed (assets/serving.py). With ``rollback: true`` (the ``rollback_job``, ``cvops
rollback``) the decision is to restore the previous champion.

The registry's gate (torch, for scoring both models on the current test split) is imported
inside the asset body, so loading the code location stays light (see assets/training.py).
"""

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, Config, DataVersion, MaterializeResult, asset
from pydantic import Field

from assets.automation import ON_UPSTREAM_UPDATE
from assets.metadata import ASSET_OWNERS, FLOAT, INT, STRING, artifact, figure, records_table, safe_metadata, upstream
from resources.storage import ArtifactStore

CHECK_NO_REGRESSION = "check_production_model_no_regression"


class ProductionModelConfig(Config):
    margin: float = Field(default=0.0, description="accuracy the challenger must gain over the champion (whole test split)")
    regression_tolerance: float = Field(
        default=0.01,
        description="how far the model serving after the gate may score below the current champion on the "
        "'previous' test slice (the champion's own data), both measured now",
    )
    rollback: bool = Field(default=False, description="decide to restore the previous champion (the rollback job)")


@asset(
    deps=["trained_model"],
    group_name="training",
    kinds={"python"},
    code_version="2",
    owners=ASSET_OWNERS,
    automation_condition=ON_UPSTREAM_UPDATE,
    check_specs=[
        AssetCheckSpec(
            CHECK_NO_REGRESSION,
            asset="production_model",
            blocking=True,
            description="On the test samples of the champion's own dataset, the model serving after the gate scores "
            "no worse than the current champion (minus the tolerance), both measured now.",
        )
    ],
    description="The champion gate: the challenger should replace the champion when it beats it on the current "
    "test split by the margin, without regressing on the champion's own data. Records the decision; "
    "onnx_runtime publishes it. `cvops rollback` decides to restore the previous champion.",
)
def production_model(
    context: AssetExecutionContext, config: ProductionModelConfig, artifact_store: ArtifactStore
) -> MaterializeResult:
    from cvops_dagster.registry.decisions import decision_key
    from cvops_dagster.registry.gate import GateConfig, decide_promotion, decide_rollback
    from cvops_dagster.registry.history import read_history

    storage = artifact_store.storage
    if config.rollback:
        decision, inputs = decide_rollback(storage), {}
    else:
        trained = upstream(context, "trained_model")
        gate = GateConfig(margin=config.margin, regression_tolerance=config.regression_tolerance)
        decision = decide_promotion(storage, trained.figure("model_id"), trained.figure("dataset_version"), gate)
        inputs = {"trained_model": trained.reference("model_id", "dataset_version")}
    context.log.info(f"decision {decision.decision_id}: {decision.kind} {decision.target_model_id} ({decision.reason})")
    challenger = (decision.metrics.get("challenger") or {}).get("all") or {}
    champion = (decision.metrics.get("champion") or {}).get("all") or {}
    check = decision.no_regression
    return MaterializeResult(
        metadata=safe_metadata({
            "decision_id": decision.decision_id,
            "decision": decision.kind,
            "target_model_id": decision.target_model_id,
            "model_id": decision.target_model_id,
            "test_accuracy": figure(decision.target_metrics.get("accuracy")),
            # When the gate put the target forward: its promotion for a new champion, else the
            # champion's own promotion time from the history.
            "promoted_at": decision.decided_at if decision.promoted else _promoted_at(storage, decision.target_model_id),
            "dataset_version": decision.dataset_version,
            "promoted": decision.promoted,
            "reason": decision.reason,
            "challenger_id": decision.challenger_id,
            "challenger_accuracy": figure(challenger.get("accuracy")),
            "champion_id": decision.champion_id,
            "champion_accuracy_before": figure(champion.get("accuracy")),
            "slices": records_table(_slice_rows(decision), SLICE_COLUMNS),
            "accepted": decision.check_passed,
            "inputs": inputs,
            "history": records_table(_history_rows(read_history(storage)), HISTORY_COLUMNS, limit=50),
            "uri": artifact(storage.uri(decision_key(decision.decision_id))),
        }),
        data_version=DataVersion(decision.target_model_id),
        check_results=[
            AssetCheckResult(check_name=CHECK_NO_REGRESSION, passed=decision.check_passed, metadata=safe_metadata(check))
        ],
    )


def _promoted_at(storage, model_id: str):  # noqa: ANN001, ANN202
    from cvops_dagster.registry.history import replay_history

    stack = replay_history(storage).stack
    return next((c.promoted_at for c in reversed(stack) if c.model_id == model_id), None)


#: The promotion history as a table, newest event first.
HISTORY_COLUMNS = {
    "at": STRING, "event": STRING, "model_id": STRING, "replaces": STRING, "dataset_version": STRING,
    "accuracy": FLOAT, "macro_f1": FLOAT, "reason": STRING,
}  # fmt: skip
#: The gate's scores: each model on the whole current test split and on its two slices.
SLICE_COLUMNS = {"model": STRING, "model_id": STRING, "slice": STRING, "accuracy": FLOAT, "macro_f1": FLOAT, "n": INT}


def _history_rows(history):  # noqa: ANN001, ANN202
    return [{**e, **{k: (e.get("metrics") or {}).get(k) for k in ("accuracy", "macro_f1")}} for e in reversed(history)]


def _slice_rows(decision):  # noqa: ANN001, ANN202
    # A promotion scores both models per slice; a rollback records each model's own figures.
    ids = {"challenger": decision.challenger_id, "champion": decision.champion_id,
           "restored": decision.target_model_id, "rolled_back": decision.champion_id}  # fmt: skip
    rows = []
    for role, scores in (decision.metrics or {}).items():
        slices = {"all": scores} if isinstance(scores, dict) and "accuracy" in scores else scores
        for name, figures in (slices or {}).items() if isinstance(slices, dict) else ():
            if isinstance(figures, dict):
                rows.append({"model": role, "model_id": ids.get(role), "slice": name, **figures})
    return rows
