"""The whole lifecycle on S3 (moto's server on 127.0.0.1): seed, run, status and predict, as a user
runs them, with the landing zone and every artifact in buckets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.s3server import s3_server
from tests.test_cli import cvops

pytestmark = pytest.mark.slow

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS.items():
            mp.setenv(name, value)
        with s3_server(("landing", "cvops")) as url:
            yield url


def test_seed_run_status_predict_on_s3(tmp_path: Path, endpoint: str) -> None:
    env = {
        **AWS,
        "CVOPS_LANDING": "s3://landing/in",
        "CVOPS_ARTIFACT_ROOT": "s3://cvops/artifacts",
        "CVOPS_S3_ENDPOINT_URL": endpoint,
    }
    cvops("seed", cwd=tmp_path, env=env)
    # A small budget: this test is about S3, the search and training have their own tests.
    (tmp_path / "small.yaml").write_text(
        "ops:\n  hpo_study: {config: {n_trials: 2, max_epochs: 3}}\n  trained_model: {config: {max_epochs: 8}}\n"
    )
    cvops("run", "--config", str(tmp_path / "small.yaml"), cwd=tmp_path, env=env)
    status = json.loads(cvops("status", "--json", cwd=tmp_path, env=env).stdout)
    cleaned, trained, runtime = status["cleaned_dataset"], status["trained_model"], status["onnx_runtime"]
    assert cleaned["input"] == 1124 and trained["dataset_version"] == cleaned["version"]
    assert trained["test_accuracy"] >= 0.95
    assert runtime["model_id"] == status["production_model"]["model_id"]
    # The production stream on the S3 landing zone: predicted, reported on, labels read.
    from cvops_dagster.monitoring.sample_stream import delayed_labels

    predictions, reports = status["batch_predictions"]["batches"], status["drift_report"]["batches"]
    assert {b: p["images"] for b, p in predictions.items()} == {"prod_001": 150, "prod_002": 120, "prod_003": 240}
    assert predictions["prod_001"]["accuracy"] >= 0.9 and predictions["prod_002"]["accuracy"] is None
    assert reports["prod_003"]["drift"] is True and reports["prod_001"]["drift"] is False
    labelled = sum(len(delayed_labels(b)) for b in predictions)
    assert status["review_feedback"]["labelled_samples"] == labelled

    # The review dataset on an S3 artifact root: FiftyOne reads the local media cache.
    review = status["edge_case_review"]
    assert 500 <= review["production_samples"] <= 510 and review["test_split_samples"] > 0
    assert review["samples"] == review["production_samples"] + review["test_split_samples"]
    assert review["views"]["edge_cases"] > 0 and review["views"]["drift_prod_003"] > 0
    media = [p for p in (tmp_path / ".cvops-media").rglob("*") if p.is_file()]
    assert len(media) == review["samples"] and review["media_folder"] == str((tmp_path / ".cvops-media").resolve())
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="cvops") for o in page.get("Contents", [])]
    assert any(k.startswith("artifacts/runtimes/") and k.endswith(".onnx") for k in keys)
    assert {f"artifacts/monitoring/predictions/{b}.parquet" for b in predictions} <= set(keys)
    # The Optuna study followed the artifact root instead of a folder of the working directory.
    assert "artifacts/optuna/journal.log" in keys and not (tmp_path / ".cvops-optuna").exists()
    assert not (tmp_path / ".cvops").exists(), "an artifact was written locally instead of to S3"

    # Predict local copies of a few landed digits with the runtime served from S3.
    images = []
    for key in sorted(k for k in _keys(client, "landing", "in/batch_003/") if k.endswith(".png"))[:: 60][:8]:
        target = tmp_path / "imgs" / key.replace("/", "_")
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(client.get_object(Bucket="landing", Key=key)["Body"].read())
        images.append((target, key.split("/")[2]))
    out = cvops("predict", "--json", *(str(p) for p, _ in images), cwd=tmp_path, env=env)
    predictions = json.loads(out.stdout)
    correct = sum(p["label"] == label for p, (_, label) in zip(predictions, images, strict=True))
    assert correct >= len(images) - 1, predictions


def _keys(client, bucket: str, prefix: str) -> list[str]:  # noqa: ANN001
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]
