"""Batch predictions: the served runtime's outputs on every image of a production batch.

:func:`predict_batch` is what the ``batch_predictions`` asset runs for one production batch:

1. the batch is ingested like a labelled one (:func:`cvops_dagster.ingestion.ingest.ingest_batch`
   with ``production=True``): every accepted file is copied to ``images/<sha256>.<ext>``, so
   it outlives the landing zone and can become training data once labelled; rejected entries
   (symlinks, hidden files, subfolders...) keep their landing reason;
2. the ingested files are decoded in the decode sandbox that cleaning uses
   (:func:`cvops_dagster.imaging.sandbox.decode_files`): a hostile file is quarantined with the
   decoder's reason (``decode_timeout``, ``decoder_crashed``, ``not_an_image``...);
3. the image features are the sandbox's, computed by the one feature function cleaning uses
   (:func:`cvops_dagster.imaging.features.pixel_features`);
4. the runtime predicts the decoded images through the shared preprocessing
   (:meth:`~cvops_dagster.serving.predictor.Predictor.predict`), in batches of 64.

One row per landing entry ends in exactly one status: ``predicted``, ``quarantined`` (decoder
reason) or ``rejected`` (landing reason); nothing is lost. The frame is written to
``monitoring/predictions/<batch_id>.parquet`` with the model id and runtime hash on every row.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.image_facts import decode_keys
from cvops_dagster.imaging.policy import DecodeConfig
from cvops_dagster.ingestion.ingest import STATUS_INGESTED, ingest_batch
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.serving.predictor import Predictor

logger = logging.getLogger(__name__)

PREDICTIONS_PREFIX = "monitoring/predictions"
STATUS_PREDICTED = "predicted"
STATUS_QUARANTINED = "quarantined"
STATUS_REJECTED = "rejected"

#: Numeric image features carried per image (the drift tests use them).
NUMERIC_FEATURES = ("width", "height", "aspect_ratio", "channels", "brightness", "contrast", "sharpness", "file_size")
#: Files decoded and predicted per chunk: bounds the pixels held in memory at once.
CHUNK_FILES = 1024
#: Decoded pixels come back from the workers up to this size (a 4k RGB photo); larger ones
#: are refused by the decode policy's pixel limit long before.
_KEEP_PIXELS = 4096 * 4096 * 3

PREDICTION_COLUMNS = [
    "record_id", "batch_id", "path", "status", "reason", "reason_detail", "sample_id", "image_key", "format",
    *NUMERIC_FEATURES, "label", "class_index", "confidence", "probabilities", "embedding", "model_id", "runtime_sha256",
]  # fmt: skip


def predictions_key(batch_id: str) -> str:
    """``monitoring/predictions/<batch_id>.parquet``."""
    return f"{PREDICTIONS_PREFIX}/{batch_id}.parquet"


@dataclass
class BatchPredictions:
    """What :func:`predict_batch` produced for one production batch.

    Attributes:
        batch_id: the production batch.
        frame: one row per landing entry (columns :data:`PREDICTION_COLUMNS`).
        key: where the frame was written.
        model_id, runtime_sha256: the runtime that predicted.
        labels: the runtime's class labels (``class_index`` indexes them).
        seconds: wall time of decoding + predicting (ingestion excluded).
        timings: seconds per phase (``ingest``, ``decode``, ``predict``).
    """

    batch_id: str
    frame: pd.DataFrame
    key: str
    model_id: str
    runtime_sha256: str
    labels: tuple[str, ...]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def predicted(self) -> pd.DataFrame:
        """The rows with a prediction."""
        return self.frame[self.frame["status"] == STATUS_PREDICTED]

    @property
    def images(self) -> int:
        return len(self.predicted)

    @property
    def quarantined(self) -> int:
        """Entries without a prediction (decoder quarantine and landing rejections)."""
        return len(self.frame) - self.images

    def reasons(self) -> dict[str, int]:
        """Entries without a prediction, by reason."""
        lost = self.frame[self.frame["status"] != STATUS_PREDICTED]
        return dict(sorted(Counter(str(r) for r in lost["reason"]).items()))

    def class_counts(self) -> dict[str, int]:
        counts = Counter(str(label) for label in self.predicted["label"])
        return {label: int(counts.get(label, 0)) for label in self.labels}

    @property
    def mean_confidence(self) -> float | None:
        return float(self.predicted["confidence"].mean()) if self.images else None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The figures ``cvops status --json`` shows per batch (``accuracy`` is added by labels)."""
        return {
            "images": self.images,
            "quarantined": self.quarantined,
            "class_counts": self.class_counts(),
            "mean_confidence": self.mean_confidence,
            "model_id": self.model_id,
            "runtime_sha256": self.runtime_sha256,
        }


def _pixels(storage: ArtifactStorage, key: str, fact: pd.Series, kept: np.ndarray | None) -> np.ndarray | None:
    """The canonical pixels of one decoded file, or ``None`` when the sandbox refused it.

    A file that already is a canonical PNG (``passthrough``: plain 8-bit PNG, only the
    critical chunks, checked in the sandbox) comes back without pixels, since its bytes are
    its canonical form; it is read here with Pillow, which is safe for exactly such a file.
    """
    if not bool(fact["ok"]):
        return None
    if kept is not None:
        return kept
    if bool(fact["passthrough"]):
        with Image.open(io.BytesIO(storage.read_bytes(key))) as image:
            return np.asarray(image)
    return None


def _decode_and_predict(
    storage: ArtifactStorage, keys: list[str], predictor: Predictor, config: DecodeConfig, workers: int | None
) -> tuple[pd.DataFrame, list[np.ndarray | None], dict[str, float]]:
    """Decode facts per key (in input order) and the model outputs of the decodable ones."""
    timings = {"decode": 0.0, "predict": 0.0}
    facts_parts: list[pd.DataFrame] = []
    outputs: list[tuple[int, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cvops-predict-") as scratch:
        for start in range(0, len(keys), CHUNK_FILES):
            chunk = keys[start : start + CHUNK_FILES]
            began = time.perf_counter()
            decoded = decode_keys(storage, chunk, config, workers, Path(scratch), keep_pixels_up_to=_KEEP_PIXELS)
            timings["decode"] += time.perf_counter() - began
            facts_parts.append(decoded.facts)
            pixels = [_pixels(storage, key, decoded.facts.iloc[i], decoded.pixels[i]) for i, key in enumerate(chunk)]
            ok = [i for i, array in enumerate(pixels) if array is not None]
            began = time.perf_counter()
            if ok:
                result = predictor.predict([pixels[i] for i in ok], batch_size=64)
                outputs.append((start, (ok, result)))
            timings["predict"] += time.perf_counter() - began
    facts = pd.concat(facts_parts, ignore_index=True) if facts_parts else pd.DataFrame()
    per_row: list[Any] = [None] * len(keys)
    for start, (ok, result) in outputs:
        for j, i in enumerate(ok):
            per_row[start + i] = (
                int(result.class_indices[j]),
                float(result.confidences[j]),
                result.probabilities[j].astype(np.float32),
                result.embeddings[j].astype(np.float32),
            )
    return facts, per_row, timings


def predict_batch(
    landing: LandingZone,
    storage: ArtifactStorage,
    batch_id: str,
    predictor: Predictor,
    *,
    config: DecodeConfig = DecodeConfig(),
    workers: int | None = None,
) -> BatchPredictions:
    """Ingest a production batch and predict every decodable image with ``predictor``.

    Args:
        landing: the landing zone holding ``production/<batch_id>/``.
        storage: the artifact storage (images, manifest and predictions go there).
        batch_id: the production batch.
        predictor: the served runtime (see
            :func:`~cvops_dagster.serving.pointer.open_production_predictor`).
        config: decoding limits (the cleaning defaults).
        workers: decode worker processes (default: one per core).

    Returns:
        The predictions, already written to :func:`predictions_key`.
    """
    began = time.perf_counter()
    ingested = ingest_batch(landing, storage, batch_id, production=True)
    ingest_s = time.perf_counter() - began
    manifest = ingested.manifest.reset_index(drop=True)
    accepted = manifest[manifest["status"] == STATUS_INGESTED]
    keys = list(dict.fromkeys(accepted["image_key"].astype(str)))  # identical files decode once
    facts, outputs, timings = _decode_and_predict(storage, keys, predictor, config, workers)
    model_id = predictor.metadata.model_id
    frame = _assemble(manifest, keys, facts, outputs, predictor.labels)
    frame["batch_id"] = batch_id
    frame["model_id"] = model_id
    frame["runtime_sha256"] = predictor.sha256
    frame = prediction_frame(frame)
    key = predictions_key(batch_id)
    storage.write_parquet(key, frame)
    seconds = timings["decode"] + timings["predict"]
    result = BatchPredictions(
        batch_id, frame, key, model_id, predictor.sha256, tuple(predictor.labels), seconds, {"ingest": ingest_s, **timings}
    )
    logger.info(
        "batch %s: %d predicted, %d without prediction, %.1f images/s (model %s)",
        batch_id, result.images, result.quarantined, result.images_per_second, model_id,
    )
    return result


def _assemble(
    manifest: pd.DataFrame, keys: list[str], facts: pd.DataFrame, outputs: list[Any], labels: Sequence[str]
) -> pd.DataFrame:
    """One row per manifest entry: rejected (landing reason), quarantined (decoder reason) or
    predicted (features and model outputs), joined on the image key (identical files share one
    decode and one prediction)."""
    per_key = facts[["format", "reason", "reason_detail", *NUMERIC_FEATURES]].copy()
    per_key.insert(0, "image_key", keys)
    predicted = np.array([o is not None for o in outputs], dtype=bool)
    per_key["predicted"] = predicted
    per_key["class_index"] = [o[0] if o is not None else None for o in outputs]
    per_key["confidence"] = [o[1] if o is not None else np.nan for o in outputs]
    per_key["probabilities"] = [o[2] if o is not None else None for o in outputs]
    per_key["embedding"] = [o[3] if o is not None else None for o in outputs]
    entries = manifest[["record_id", "path", "status", "reason", "sample_id", "image_key", "size_bytes"]].rename(
        columns={"status": "ingest_status", "reason": "landing_reason"}
    )
    frame = entries.merge(per_key, on="image_key", how="left")
    ingested = (frame["ingest_status"] == STATUS_INGESTED).to_numpy()
    ok = ingested & frame["predicted"].fillna(False).astype(bool).to_numpy()
    frame["status"] = np.where(ok, STATUS_PREDICTED, np.where(ingested, STATUS_QUARANTINED, STATUS_REJECTED))
    frame["reason"] = np.where(
        ok, None, np.where(ingested, frame["reason"].where(frame["reason"].notna(), "not_predicted"), frame["landing_reason"])
    )
    frame.loc[~ingested, "reason_detail"] = None
    # Features and outputs only for predicted rows; a refused file keeps its size.
    for name in (*NUMERIC_FEATURES, "format", "class_index", "confidence", "probabilities", "embedding"):
        frame.loc[~ok, name] = None
    frame.loc[~ok, "file_size"] = frame.loc[~ok, "size_bytes"]
    label_of = np.asarray(labels, dtype=object)
    frame["label"] = None
    indices = frame.loc[ok, "class_index"].astype("int64").to_numpy()
    frame.loc[ok, "label"] = label_of[indices] if len(indices) else []
    return frame


def prediction_frame(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows as the predictions frame, with fixed dtypes whatever the rows hold."""
    frame = pd.DataFrame(rows, columns=PREDICTION_COLUMNS) if not isinstance(rows, pd.DataFrame) else rows.reindex(columns=PREDICTION_COLUMNS)
    for name in ("record_id", "batch_id", "path", "status", "reason", "reason_detail", "sample_id", "image_key",
                 "format", "label", "model_id", "runtime_sha256"):  # fmt: skip
        frame[name] = frame[name].astype("string")
    for name in ("width", "height", "channels", "file_size", "class_index"):
        frame[name] = pd.array(frame[name], dtype="Int64")
    for name in ("aspect_ratio", "brightness", "contrast", "sharpness", "confidence"):
        frame[name] = frame[name].astype("float64")
    return frame


def read_predictions(storage: ArtifactStorage, batch_id: str) -> pd.DataFrame | None:
    """The stored predictions of a batch, or ``None`` when it was never predicted."""
    key = predictions_key(batch_id)
    return storage.read_parquet(key) if storage.exists(key) else None


def realised_accuracy(frame: pd.DataFrame, labels: dict[str, str]) -> tuple[float | None, int]:
    """Accuracy of the predictions against delayed labels (``file -> label``), and how many
    predicted images the labels cover; ``None`` when they cover none."""
    predicted = frame[frame["status"] == STATUS_PREDICTED]
    truth = predicted["path"].astype(str).map(labels)
    covered = truth.notna()
    n = int(covered.sum())
    if n == 0:
        return None, 0
    return float((predicted.loc[covered, "label"].astype(str) == truth[covered]).mean()), n


def drift_inputs(frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Features, embeddings, predicted classes and confidences of the predicted rows, as the
    drift tests take them (:class:`~cvops_dagster.monitoring.drift.DriftSample`)."""
    predicted = frame[frame["status"] == STATUS_PREDICTED]
    features = {name: predicted[name].astype("float64").to_numpy() for name in NUMERIC_FEATURES}
    if len(predicted):
        embeddings = np.stack([np.asarray(e, dtype=np.float32) for e in predicted["embedding"]])
    else:
        embeddings = np.zeros((0, 0), dtype=np.float32)
    classes = predicted["class_index"].astype("int64").to_numpy()
    confidences = predicted["confidence"].astype("float64").to_numpy()
    return features, embeddings, classes, confidences
