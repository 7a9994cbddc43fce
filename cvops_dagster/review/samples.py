"""The rows of the review dataset: one per predicted production image, one per test-split image.

A row holds what a reviewer needs beside the image: the served runtime's prediction
(label, confidence, logits = log-probabilities, which softmax back to the same probabilities),
its embedding, the image features cleaning computes, the batch, the model, whether the batch
drifted, and the ground truth when known (delayed labels for production images, the dataset's
label for the test split). :mod:`cvops_dagster.review.dataset` writes them into FiftyOne.

Keys: ``production:<batch_id>:<sample_id>`` and ``test_split:<sample_id>`` (``sample_id`` is the
sha256 of the image's bytes), so re-building updates the same samples instead of adding copies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.monitoring.predictions import NUMERIC_FEATURES, STATUS_PREDICTED, read_predictions
from cvops_dagster.monitoring.reference import predict_splits
from cvops_dagster.serving.predictor import Predictor

logger = logging.getLogger(__name__)

GROUP_PRODUCTION = "production"
GROUP_TEST = "test_split"
TEST_SPLIT = "test"
#: Cached test-split predictions of a served model: ``review/test_split/<model_id>.parquet``.
TEST_PREDICTIONS_PREFIX = "review/test_split"

#: Columns of a review row (see the module docstring).
ROW_COLUMNS = [
    "key", "group", "sample_id", "image_key", "batch_id", "source_path", "model_id", "dataset_version",
    "predicted_label", "confidence", "logits", "embedding", "ground_truth", "drift_batch", *NUMERIC_FEATURES,
]  # fmt: skip


def production_rows(
    storage: ArtifactStorage,
    batch_ids: Sequence[str],
    drifted: Mapping[str, bool],
    delayed_labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per predicted image of each batch (quarantined and rejected files have no image
    to review; they are in the batch's predictions with their reason).

    Args:
        storage: the artifact store (predictions).
        batch_ids: production batches with stored predictions (others are skipped, logged).
        drifted: batch id -> whether its latest drift report flagged it.
        delayed_labels: sample id -> known label (the review_feedback manifest's), if any.
    """
    frames = []
    for batch_id in batch_ids:
        frame = read_predictions(storage, batch_id)
        if frame is None:
            logger.warning("review: batch %s has no stored predictions; skipped", batch_id)
            continue
        frame = frame[frame["status"] == STATUS_PREDICTED]
        # One sample per image: byte-identical files of one batch are one image (the first path).
        frame = frame.sort_values("path", kind="stable").drop_duplicates("sample_id", keep="first")
        if not len(frame):
            continue
        probabilities = np.stack(frame["probabilities"].to_numpy())
        rows = pd.DataFrame({
            "key": [f"{GROUP_PRODUCTION}:{batch_id}:{s}" for s in frame["sample_id"]],
            "group": GROUP_PRODUCTION,
            "sample_id": frame["sample_id"].astype(str).to_numpy(),
            "image_key": frame["image_key"].astype(str).to_numpy(),
            "batch_id": batch_id,
            "source_path": frame["path"].astype(str).to_numpy(),
            "model_id": frame["model_id"].astype(str).to_numpy(),
            "dataset_version": None,
            "predicted_label": frame["label"].astype(str).to_numpy(),
            "confidence": frame["confidence"].astype(float).to_numpy(),
            "logits": list(_log_probabilities(probabilities)),
            "embedding": list(np.stack(frame["embedding"].to_numpy()).astype(np.float32)),
            "ground_truth": [(delayed_labels or {}).get(str(s)) for s in frame["sample_id"]],
            "drift_batch": bool(drifted.get(batch_id, False)),
            **{name: frame[name].astype(float).to_numpy() for name in NUMERIC_FEATURES},
        })  # fmt: skip
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)[ROW_COLUMNS] if frames else pd.DataFrame(columns=ROW_COLUMNS)


def test_split_rows(storage: ArtifactStorage, predictor: Predictor) -> pd.DataFrame:
    """The served model's test split (its dataset version's clean ``test`` samples, with their
    label as ground truth) through the served runtime; predictions cached per model.

    Raises:
        FileNotFoundError: the model's dataset version is gone from the artifact store.
    """
    model_id = predictor.metadata.model_id
    version = predictor.metadata.dataset_version
    cache = f"{TEST_PREDICTIONS_PREFIX}/{model_id}.parquet"
    if storage.exists(cache):
        try:
            return _from_cache(storage.read_parquet(cache))
        except (KeyError, ValueError, OSError) as exc:  # a damaged cache entry is rebuilt
            logger.warning("review: cached test-split predictions %s unreadable (%s); rebuilding", cache, exc)
    test, outputs = predict_splits(storage, version, predictor, (TEST_SPLIT,), "the review dataset's test split")
    rows = pd.DataFrame({
        "key": [f"{GROUP_TEST}:{s}" for s in test["sample_id"]],
        "group": GROUP_TEST,
        "sample_id": test["sample_id"].astype(str).to_numpy(),
        "image_key": test["image_key"].astype(str).to_numpy(),
        "batch_id": test["batch_id"].astype(str).to_numpy() if "batch_id" in test else None,
        "source_path": test["path"].astype(str).to_numpy() if "path" in test else test["sample_id"].astype(str).to_numpy(),
        "model_id": model_id,
        "dataset_version": version,
        "predicted_label": list(outputs.labels),
        "confidence": outputs.confidences.astype(float),
        "logits": list(_log_probabilities(outputs.probabilities)),
        "embedding": list(outputs.embeddings.astype(np.float32)),
        "ground_truth": test["label"].astype(str).to_numpy(),
        "drift_batch": False,
        **{name: test[name].astype(float).to_numpy() if name in test else np.nan for name in NUMERIC_FEATURES},
    })[ROW_COLUMNS]  # fmt: skip
    storage.write_parquet(cache, _to_cache(rows))
    return rows


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Logits FiftyOne can softmax back to the stored probabilities (up to a constant)."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)).astype(np.float32)


def _to_cache(rows: pd.DataFrame) -> pd.DataFrame:
    out = rows.copy()
    out["logits"] = [np.asarray(v, dtype=np.float32).tolist() for v in rows["logits"]]
    out["embedding"] = [np.asarray(v, dtype=np.float32).tolist() for v in rows["embedding"]]
    return out


def _from_cache(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame[ROW_COLUMNS].copy()
    frame["logits"] = [np.asarray(v, dtype=np.float32) for v in frame["logits"]]
    frame["embedding"] = [np.asarray(v, dtype=np.float32) for v in frame["embedding"]]
    return frame
