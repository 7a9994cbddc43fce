"""The drift reference of a production model: built once per model, cached by model id.

The reference is what the model produced on its own held-out data: the validation and test
splits of the dataset version it was trained on (``dataset_version`` in its runtime file).
Never the training split, whose outputs are over-confident (the model has fit those very
images), which would make every honest production batch look drifted in its confidences.

The image features come from the dataset manifest (cleaning computed them with the one
feature function batch predictions use); the embeddings, predicted classes and confidences
come from running the *served runtime* on the canonical images, so reference and batch go
through the same ONNX graph and preprocessing.

Cached at ``monitoring/references/<model_id>/<settings>.npz`` (no pickle; see
:meth:`~cvops_dagster.monitoring.drift.DriftReference.to_npz`), where ``<settings>`` is a
digest of the build-time settings: a report with other settings gets its own reference.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from cvops_dagster.core.contracts import dataset_keys
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.monitoring.drift import DriftConfig, DriftReference, DriftSample, build_reference
from cvops_dagster.monitoring.predictions import NUMERIC_FEATURES
from cvops_dagster.serving.predictor import Predictions, Predictor

logger = logging.getLogger(__name__)

REFERENCES_PREFIX = "monitoring/references"
#: The splits the reference is drawn from (see the module docstring for why not ``train``).
REFERENCE_SPLITS = ("val", "test")


def settings_digest(config: DriftConfig) -> str:
    """A short digest of the settings that shape a reference (and the seed)."""
    settings = {
        "knn_k": config.knn_k,
        "outlier_quantile": config.outlier_quantile,
        "mmd_max_reference": config.mmd_max_reference,
        "knn_max_reference": config.knn_max_reference,
        "min_batch": config.min_batch,
        "seed": config.seed,
        "splits": REFERENCE_SPLITS,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def reference_key(model_id: str, config: DriftConfig) -> str:
    """``monitoring/references/<model_id>/<settings digest>.npz``."""
    return f"{REFERENCES_PREFIX}/{model_id}/{settings_digest(config)}.npz"


@dataclass(frozen=True)
class CachedReference:
    """A reference and where it lives.

    Attributes:
        reference: the reference.
        key: its storage key.
        built: whether this call built it (``False``: read from the cache).
        dataset_version: the dataset version whose held-out splits it holds.
    """

    reference: DriftReference
    key: str
    built: bool
    dataset_version: str


def predict_splits(
    storage: ArtifactStorage, dataset_version: str, predictor: Predictor, splits: tuple[str, ...], purpose: str
) -> tuple[pd.DataFrame, Predictions]:
    """The clean samples of ``splits`` of ``dataset_version`` (manifest rows, by sample id) and
    ``predictor``'s outputs on their canonical images.

    Raises:
        FileNotFoundError: the dataset version is gone (``purpose`` says who needed it).
    """
    manifest_key, _ = dataset_keys(dataset_version)
    if not storage.exists(manifest_key):
        raise FileNotFoundError(f"{purpose} needs dataset {dataset_version!r}, but {storage.uri(manifest_key)} is missing")
    frame = storage.read_parquet(manifest_key)
    rows = frame[(frame["outcome"] == "clean") & frame["split"].isin(splits)].sort_values("sample_id")
    images = []
    for data in storage.read_many([str(key) for key in rows["image_key"]]):
        image = Image.open(io.BytesIO(data))  # canonical PNGs this system wrote itself
        image.load()
        images.append(image)
    return rows, predictor.predict(images, batch_size=64)


def reference_sample(storage: ArtifactStorage, dataset_version: str, predictor: Predictor) -> DriftSample:
    """The held-out splits of ``dataset_version`` run through ``predictor``.

    Raises:
        FileNotFoundError: the dataset version is gone from the artifact store.
    """
    rows, outputs = predict_splits(
        storage, dataset_version, predictor, tuple(REFERENCE_SPLITS), "the drift reference (the served model's training data)"
    )
    features = {name: rows[name].astype("float64").to_numpy() for name in NUMERIC_FEATURES if name in rows}
    return DriftSample(features, outputs.embeddings, outputs.class_indices, outputs.confidences.astype(np.float64))


def load_or_build_reference(
    storage: ArtifactStorage, predictor: Predictor, config: DriftConfig | None = None
) -> CachedReference:
    """The served model's reference: read from the cache, or built and cached once.

    Args:
        storage: the artifact storage (dataset, cache).
        predictor: the runtime the reference describes (its model id and dataset version come
            from the runtime file's own metadata).
        config: the drift settings (build-time ones shape the reference).

    Raises:
        FileNotFoundError: the model's dataset version is gone.
        ValueError: the held-out splits hold fewer images than a reference needs.
    """
    config = config or DriftConfig()
    model_id = predictor.metadata.model_id
    dataset_version = predictor.metadata.dataset_version
    key = reference_key(model_id, config)
    if storage.exists(key):
        try:
            reference = DriftReference.from_npz(storage.read_bytes(key))
            if reference.model_id == model_id:
                return CachedReference(reference, key, False, dataset_version)
            logger.warning("cached reference %s names model %r; rebuilding", key, reference.model_id)
        except (ValueError, OSError, KeyError) as exc:  # a damaged cache entry is rebuilt, not trusted
            logger.warning("cached reference %s is unreadable (%s); rebuilding", key, exc)
    sample = reference_sample(storage, dataset_version, predictor)
    reference = build_reference(sample, predictor.labels, config, model_id=model_id)
    storage.write_bytes(key, reference.to_npz())
    logger.info("drift reference for model %s cached at %s (%d images)", model_id, storage.uri(key), reference.n)
    return CachedReference(reference, key, True, dataset_version)
