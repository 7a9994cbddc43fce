"""onnx_runtime: the champion as a self-describing ONNX file (and an INT8 one when it earns it)."""

import json

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.automation import ON_UPSTREAM_UPDATE
from assets.metadata import json_value
from resources.storage import ArtifactStore

CHECK_PARITY = "check_onnx_runtime_parity"


@asset(
    deps=["production_model"],
    group_name="serving",
    kinds={"onnx"},
    code_version="1",
    automation_condition=ON_UPSTREAM_UPDATE,
    check_specs=[
        AssetCheckSpec(
            CHECK_PARITY,
            asset="onnx_runtime",
            blocking=True,
            description="On the test split: max |logit difference| vs PyTorch <= 1e-4 and >= 99.9% identical classes.",
        )
    ],
    description="The production champion exported with torch.onnx (dynamic batch, logits + embedding), checked "
    "with onnx.checker, metadata embedded; INT8 (static QDQ, per-channel) kept only when accurate and faster.",
)
def onnx_runtime(context: AssetExecutionContext, artifact_store: ArtifactStore) -> MaterializeResult:
    # torch, ONNX and ONNX Runtime load in this step only (see assets/training.py).
    from cvops_dagster.registry.promotion import current_champion
    from cvops_dagster.serving.build import build_runtimes

    champion = current_champion(artifact_store.storage)
    if champion is None:
        raise ValueError("no production model yet: materialize production_model first")
    build = build_runtimes(artifact_store.storage, champion["model_id"], champion.get("dataset_version"))
    summary = build.summary()
    context.log.info(f"runtime {summary['path']}; int8: {build.int8.reason}")
    return MaterializeResult(
        metadata={
            "model_id": build.model_id,
            "dataset_version": build.dataset_version,
            "path": MetadataValue.path(summary["path"]),
            "sha256": summary["sha256"],
            "opset": summary["opset"],
            "parity_max_abs_diff": build.parity.max_abs_diff,
            "parity_argmax_agreement": build.parity.argmax_agreement,
            "int8": json_value(summary["int8"]),
            "int8_latency_ms": build.int8.int8_latency_ms,
            "fp32_latency_ms": build.int8.fp32_latency_ms,
            "onnx_metadata": json_value(json.loads(json.dumps(build.export.metadata, default=str))),
        },
        check_results=[
            AssetCheckResult(
                check_name=CHECK_PARITY,
                passed=build.parity.passed,
                metadata={
                    "max_abs_diff": build.parity.max_abs_diff,
                    "argmax_agreement": build.parity.argmax_agreement,
                    "samples": build.parity.n,
                },
            )
        ],
    )
