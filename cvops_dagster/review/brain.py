"""FiftyOne Brain runs over the review dataset, keyed by the model that made the embeddings.

Every run uses the project's own outputs, never a model download (offline by design): the
served runtime's embeddings (``embedding``) and logits (``prediction.logits``).

- ``uniqueness_<model>``: how unlike the rest a sample is (``compute_uniqueness``);
- ``hardness_<model>``: the model's uncertainty from its logits (``compute_hardness``);
- ``mistakenness_<model>``: how likely the ground truth is wrong, on samples that have one
  (``compute_mistakenness`` with the logits);
- ``similarity_<model>``: a similarity index on the embeddings (cosine, scikit-learn
  backend); its near duplicates (:attr:`BrainConfig.near_duplicate_distance`) are written to
  ``near_duplicate_group`` (the id of the sample each group keeps);
- ``visualization_<model>``: a 2-D map of the embeddings (``compute_visualization``, PCA:
  FiftyOne's default method, UMAP, needs ``umap-learn``, which this project does not install).

Runs of other models are deleted, so the dataset describes the served model; each run is
recomputed on every build (the samples changed).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

KINDS = ("uniqueness", "hardness", "mistakenness", "similarity", "visualization")
NEAR_DUPLICATE_FIELD = "near_duplicate_group"
#: Fewest samples the neighbour-based runs are meaningful on (uniqueness uses 3 neighbours).
MIN_SAMPLES = 5


@dataclass(frozen=True)
class BrainConfig:
    """Settings of the Brain runs.

    Attributes:
        near_duplicate_distance: cosine distance between embeddings under which two samples
            are near duplicates (0: identical outputs).
        visualization_method: ``pca`` or ``tsne`` (``umap`` needs ``umap-learn``).
    """

    near_duplicate_distance: float = 0.01
    visualization_method: str = "pca"


def model_tag(model_id: str) -> str:
    """``model_id`` as the suffix of a field name and brain key (letters, digits, ``_``)."""
    return re.sub(r"\W+", "_", model_id).strip("_")[:60] or "model"


def brain_keys(model_id: str) -> dict[str, str]:
    """Kind -> brain key (and, for uniqueness, hardness and mistakenness, the field name)."""
    tag = model_tag(model_id)
    return {kind: f"{kind}_{tag}" for kind in KINDS}


@dataclass
class BrainResult:
    """What :func:`run_brain` computed.

    Attributes:
        keys: kind -> brain key, for the runs made (a run skipped for too few samples is absent).
        seconds: kind -> wall time.
        near_duplicates: samples in a near-duplicate group (keepers included).
        skipped: kind -> why it was not run.
    """

    keys: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    near_duplicates: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def run_brain(dataset: fo.Dataset, model_id: str, config: BrainConfig = BrainConfig()) -> BrainResult:
    """Every Brain run of the module docstring on ``dataset`` for ``model_id``."""
    import fiftyone.brain as fob

    result = BrainResult()
    keys = brain_keys(model_id)
    # Another model's runs go; this model's are recomputed on the new samples.
    for existing in dataset.list_brain_runs():
        dataset.delete_brain_run(existing)
    if NEAR_DUPLICATE_FIELD in dataset.get_field_schema():
        dataset.set_field(NEAR_DUPLICATE_FIELD, None).save()

    n = len(dataset)
    labelled = dataset.exists("ground_truth")

    def timed(kind: str, run) -> None:  # noqa: ANN001
        started = time.perf_counter()
        run()
        result.seconds[kind] = round(time.perf_counter() - started, 3)
        result.keys[kind] = keys[kind]

    timed("hardness", lambda: fob.compute_hardness(dataset, "prediction", hardness_field=keys["hardness"], progress=False))
    if len(labelled) >= 1:
        timed(
            "mistakenness",
            lambda: fob.compute_mistakenness(
                labelled, "prediction", "ground_truth", mistakenness_field=keys["mistakenness"], use_logits=True, progress=False
            ),
        )
    else:
        result.skipped["mistakenness"] = "no sample has a ground truth"
    if n < MIN_SAMPLES:
        for kind in ("uniqueness", "similarity", "visualization"):
            result.skipped[kind] = f"{n} samples (needs {MIN_SAMPLES})"
        return result
    timed(
        "uniqueness",
        lambda: fob.compute_uniqueness(dataset, uniqueness_field=keys["uniqueness"], embeddings="embedding", progress=False),
    )

    def similarity() -> None:
        index = fob.compute_similarity(
            dataset, embeddings="embedding", brain_key=keys["similarity"], backend="sklearn", metric="cosine", progress=False
        )
        index.find_duplicates(thresh=config.near_duplicate_distance)
        groups: dict[str, str] = {}
        for keep, duplicates in (index.neighbors_map or {}).items():
            groups[keep] = keep
            for duplicate, _distance in duplicates:
                groups[duplicate] = keep
        if groups:
            dataset.set_values(NEAR_DUPLICATE_FIELD, groups, key_field="id")
        result.near_duplicates = len(groups)

    timed("similarity", similarity)
    timed(
        "visualization",
        lambda: fob.compute_visualization(
            dataset, embeddings="embedding", brain_key=keys["visualization"], method=config.visualization_method,
            num_dims=2, progress=False,
        ),
    )  # fmt: skip
    return result
