"""One build of the review dataset: rows -> media -> upsert -> Brain runs -> edge cases -> views.

:func:`build_review` is what the ``edge_case_review`` asset runs. It is idempotent: building
twice with the same inputs leaves the same samples (upsert by key), Brain runs and views.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from cvops_dagster.review.brain import BrainConfig, BrainResult, run_brain
from cvops_dagster.review.dataset import UpsertResult, set_review_label_schema, upsert_rows
from cvops_dagster.review.media import MediaCache
from cvops_dagster.review.samples import ROW_COLUMNS, production_rows, test_split_rows
from cvops_dagster.review.views import ViewConfig, edge_case_preview, mark_edge_cases, save_views

if TYPE_CHECKING:
    import fiftyone as fo

    from cvops_dagster.core.storage import ArtifactStorage
    from cvops_dagster.serving.predictor import Predictor

logger = logging.getLogger(__name__)


@dataclass
class ReviewBuild:
    """What one build did.

    Attributes:
        dataset: the FiftyOne dataset's name.
        samples: samples in it now; ``production``/``test_split``: per group.
        upsert: added, updated, removed.
        brain: the Brain runs.
        views: saved view -> sample count.
        edge_criteria: edge-case criterion -> samples it selected.
        preview_png, preview_rows: the top edge cases (thumbnails, one row each).
        seconds: phase -> wall time (``rows``, ``media``, ``upsert``, ``brain``, ``views``).
        media_downloaded, media_converted: files the media cache fetched / converted to PNG.
    """

    dataset: str
    samples: int
    production: int
    test_split: int
    upsert: UpsertResult
    brain: BrainResult
    views: dict[str, int]
    edge_criteria: dict[str, int]
    preview_png: bytes | None = None
    preview_rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    media_downloaded: int = 0
    media_converted: int = 0


def review_rows(
    storage: ArtifactStorage,
    batch_ids: Sequence[str],
    drifted: Mapping[str, bool],
    predictor: Predictor | None,
    known_labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Production rows of ``batch_ids`` plus, with a ``predictor``, its test split."""
    parts = [production_rows(storage, batch_ids, drifted, known_labels)]
    if predictor is not None:
        parts.append(test_split_rows(storage, predictor))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=ROW_COLUMNS)


def build_review(
    dataset: fo.Dataset,
    rows: pd.DataFrame,
    media: MediaCache,
    model_id: str,
    drifted_batches: Sequence[str],
    brain: BrainConfig = BrainConfig(),
    views: ViewConfig = ViewConfig(),
    labels: Sequence[str] = (),
) -> ReviewBuild:
    """Write ``rows`` into ``dataset`` and refresh its Brain runs, edge cases and views;
    with the served model's ``labels``, ``ground_truth`` becomes editable in the App."""
    seconds: dict[str, float] = {}
    mark = time.perf_counter()
    filepaths = media.paths(rows["image_key"].astype(str).tolist())
    seconds["media"] = time.perf_counter() - mark
    mark = time.perf_counter()
    upsert = upsert_rows(dataset, rows, filepaths)
    set_review_label_schema(dataset, list(labels))
    seconds["upsert"] = time.perf_counter() - mark
    mark = time.perf_counter()
    brain_result = run_brain(dataset, model_id, brain)
    seconds["brain"] = time.perf_counter() - mark
    mark = time.perf_counter()
    criteria = mark_edge_cases(dataset, brain_result.keys, views)
    counts = save_views(dataset, brain_result.keys, list(drifted_batches), views)
    preview_png, preview_rows = edge_case_preview(dataset)
    seconds["views"] = time.perf_counter() - mark
    groups = dataset.count_sample_tags()
    return ReviewBuild(
        dataset=dataset.name, samples=len(dataset), production=int(groups.get("production", 0)),
        test_split=int(groups.get("test_split", 0)), upsert=upsert, brain=brain_result, views=counts,
        edge_criteria=criteria, preview_png=preview_png, preview_rows=preview_rows,
        seconds={k: round(v, 3) for k, v in seconds.items()}, media_downloaded=media.downloaded,
        media_converted=media.converted,
    )  # fmt: skip
