"""onnx_runtime: the gate's decision put into service as a self-describing ONNX runtime (and an
INT8 one when it earns it): built or reused, verified, then published."""

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.automation import ON_UPSTREAM_UPDATE
from assets.metadata import ASSET_OWNERS, artifact, figure, json_value, safe_metadata, upstream
from resources.storage import ArtifactStore

CHECK_PARITY = "check_onnx_runtime_parity"


class OnnxRuntimeConfig(Config):
    reuse_only: bool = Field(
        default=False,
        description="publish only a runtime already built for the target model; fail when none verifies "
        "(`cvops rollback --no-export`)",
    )


@asset(
    deps=["production_model"],
    group_name="serving",
    kinds={"onnx"},
    code_version="2",
    owners=ASSET_OWNERS,
    automation_condition=ON_UPSTREAM_UPDATE,
    check_specs=[
        AssetCheckSpec(
            CHECK_PARITY,
            asset="onnx_runtime",
            blocking=True,
            description="On the test split: the largest absolute logit difference from PyTorch is at most 1e-4 and at "
            "least 99.9% of predicted classes are identical (for a reused runtime: the figures recorded when it was "
            "published, its files verified again).",
        )
    ],
    description="Publishes production_model's decision: the target model exported with torch.onnx (dynamic batch, "
    "logits + embedding) under a content-addressed name, checked with onnx.checker and for parity, INT8 (static "
    "QDQ, per-channel) kept only when accurate and faster by a margin; then a history event and the pointers "
    "(`production/current.json`, `production/serving.json`). A runtime already published for the model is reused.",
)
def onnx_runtime(context: AssetExecutionContext, config: OnnxRuntimeConfig, artifact_store: ArtifactStore) -> MaterializeResult:
    # torch, ONNX and ONNX Runtime load in this step only (see assets/training.py).
    from cvops_dagster.registry.decisions import read_decision
    from cvops_dagster.serving.publication import publish_decision

    storage = artifact_store.storage
    production = upstream(context, "production_model")
    decision = read_decision(storage, production.figure("decision_id"))
    if decision.target_model_id != production.figure("target_model_id"):
        raise ValueError(
            f"production_model (run {production.run_id}) names target {production.figure('target_model_id')}, but its "
            f"decision {decision.decision_id} names {decision.target_model_id}; materialize production_model again"
        )
    # A rollback is published by the run that decided it (the rollback job), never later.
    outcome = publish_decision(storage, decision, reuse_only=config.reuse_only, rollback_requested=production.same_run)
    context.log.info(f"{outcome.kind} {outcome.model_id}: runtime {outcome.runtime['fp32_key']}{' (reused)' if outcome.reused else ''}")
    if outcome.note:
        # A runtime published before was damaged or deleted and has been rebuilt: never silently.
        context.log.warning(f"the published runtime of {outcome.model_id} was rebuilt: {outcome.note}")
    parity = outcome.checks.get("parity") or {}
    int8 = outcome.checks.get("int8") or {}
    runtime = outcome.runtime
    parity_passed = bool(parity.get("passed", outcome.published))
    return MaterializeResult(
        metadata=safe_metadata({
            "model_id": outcome.model_id,
            "dataset_version": runtime.get("dataset_version"),
            "path": MetadataValue.path(storage.uri(runtime["fp32_key"])),
            **_artifacts(storage, runtime, outcome.published),
            "sha256": runtime["fp32_sha256"],
            "opset": outcome.checks.get("opset"),
            "parity_max_abs_diff": figure(parity.get("max_abs_diff")),
            "parity_argmax_agreement": parity.get("argmax_agreement"),  # unrounded: the check's 99.9% is strict
            "int8": json_value({
                "accepted": runtime.get("int8_key") is not None,
                "reason": int8.get("reason") or "no INT8 figures recorded for this runtime",
                "test_accuracy": int8.get("test_accuracy"),
                "path": storage.uri(runtime["int8_key"]) if runtime.get("int8_key") else None,
                "speedup": int8.get("speedup"),
                "min_speedup": int8.get("min_speedup"),
            }),
            "int8_latency_ms": figure(int8.get("int8_latency_ms")),
            "fp32_latency_ms": figure(int8.get("fp32_latency_ms")),
            "published": outcome.published,
            "publication": outcome.kind,
            "reused": outcome.reused,
            "rebuilt_because": outcome.note or None,
            "event_id": (outcome.event or {}).get("event_id"),
            "decision_id": decision.decision_id,
            "accepted": outcome.published,
            "inputs": {"production_model": production.reference("decision_id", "target_model_id")},
        }),
        data_version=DataVersion(runtime["fp32_sha256"]),
        check_results=[
            AssetCheckResult(
                check_name=CHECK_PARITY,
                passed=parity_passed,
                metadata=safe_metadata({
                    "max_abs_diff": parity.get("max_abs_diff"),
                    "argmax_agreement": parity.get("argmax_agreement"),
                    "samples": parity.get("n"),
                    "reused": outcome.reused,
                }),
            )
        ],
    )


def _artifacts(storage, runtime: dict, published: bool) -> dict:  # noqa: ANN001
    """Where the runtime files are (``uri``: FP32, ``int8_uri``) and, once published, the pointer."""
    from cvops_dagster.serving.pointer import SERVING_KEY

    out = {"uri": artifact(storage.uri(runtime["fp32_key"]))}
    if runtime.get("int8_key"):
        out["int8_uri"] = artifact(storage.uri(runtime["int8_key"]))
    if published:
        out["serving_pointer"] = artifact(storage.uri(SERVING_KEY))
    return out
