"""Saved views of the review dataset: where a reviewer starts.

- ``edge_cases``: production images that are the lowest-confidence, hardest, most unique, or
  farthest from anything in the test split (embedding outliers), N per criterion; each sample
  carries ``edge_case_reasons`` and ``edge_case_rank`` (its best rank over the criteria), and
  the view is sorted by that rank;
- ``likely_mislabeled``: samples with a ground truth, highest mistakenness first (top N);
- ``near_duplicates``: samples in a near-duplicate group, grouped;
- ``drift_<batch_id>``: one per drifted production batch, lowest confidence first.

Views are rebuilt on every build; a ``drift_*`` view of a batch no longer flagged is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cvops_dagster.review.brain import NEAR_DUPLICATE_FIELD
from cvops_dagster.review.samples import GROUP_PRODUCTION, GROUP_TEST

if TYPE_CHECKING:
    import fiftyone as fo

VIEW_EDGE_CASES = "edge_cases"
VIEW_MISLABELED = "likely_mislabeled"
VIEW_NEAR_DUPLICATES = "near_duplicates"
DRIFT_VIEW_PREFIX = "drift_"
EDGE_RANK = "edge_case_rank"
EDGE_REASONS = "edge_case_reasons"


@dataclass(frozen=True)
class ViewConfig:
    """Sizes of the saved views.

    Attributes:
        edge_cases_per_criterion: production samples taken by each edge-case criterion.
        mislabeled_top: samples in ``likely_mislabeled``.
    """

    edge_cases_per_criterion: int = 25
    mislabeled_top: int = 50


def mark_edge_cases(dataset: fo.Dataset, fields: dict[str, str], config: ViewConfig = ViewConfig()) -> dict[str, int]:
    """Set ``edge_case_reasons``/``edge_case_rank`` on every sample (``None`` off the list).

    Args:
        fields: kind -> field name of this model's ``hardness`` and ``uniqueness`` (when run).

    Returns:
        criterion -> samples it selected.
    """
    import fiftyone as fo

    for name, ftype, kwargs in ((EDGE_RANK, fo.IntField, {}), (EDGE_REASONS, fo.ListField, {"subfield": fo.StringField})):
        if name not in dataset.get_field_schema():
            dataset.add_sample_field(name, ftype, **kwargs)
    ids, tags, confidence, embeddings = dataset.values(["id", "tags", "prediction.confidence", "embedding"])
    production = np.array([GROUP_PRODUCTION in (t or ()) for t in tags], dtype=bool)
    scores: dict[str, np.ndarray] = {"low_confidence": -_floats(confidence)}
    for kind, name in (("hard", fields.get("hardness")), ("unique", fields.get("uniqueness"))):
        if name:
            scores[kind] = _floats(dataset.values(name))
    test = np.array([GROUP_TEST in (t or ()) for t in tags], dtype=bool)
    scores["embedding_outlier"] = _outlier_scores(embeddings, reference=test, query=production)

    best = np.full(len(ids), np.iinfo(np.int64).max, dtype=np.int64)
    reasons: list[list[str]] = [[] for _ in ids]
    counts: dict[str, int] = {}
    candidates = np.flatnonzero(production)
    for criterion, score in scores.items():
        pool = candidates[~np.isnan(score[candidates])]
        order = pool[np.argsort(-score[pool], kind="stable")][: config.edge_cases_per_criterion]
        counts[criterion] = len(order)
        for rank, i in enumerate(order.tolist()):
            reasons[i].append(criterion)
            best[i] = min(best[i], rank)
    ranks = [int(b) if reasons[i] else None for i, b in enumerate(best.tolist())]
    dataset.set_values(EDGE_RANK, dict(zip(ids, ranks, strict=True)), key_field="id")
    dataset.set_values(EDGE_REASONS, dict(zip(ids, [r or None for r in reasons], strict=True)), key_field="id")
    return counts


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _outlier_scores(embeddings: list[Any], reference: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Per sample: cosine distance from its embedding to the nearest test-split embedding
    (NaN outside ``query``, or without a test split to compare with)."""
    scores = np.full(len(embeddings), np.nan)
    if not reference.any() or not query.any():
        return scores
    ref = _unit(np.stack([np.asarray(embeddings[i], dtype=np.float32) for i in np.flatnonzero(reference)]))
    for start in range(0, int(query.sum()), 1024):
        idx = np.flatnonzero(query)[start : start + 1024]
        q = _unit(np.stack([np.asarray(embeddings[i], dtype=np.float32) for i in idx]))
        scores[idx] = 1.0 - (q @ ref.T).max(axis=1)
    return scores


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


def save_views(
    dataset: fo.Dataset, fields: dict[str, str], drifted_batches: list[str], config: ViewConfig = ViewConfig()
) -> dict[str, int]:
    """(Re)save every view of the module docstring; returns view name -> sample count."""
    from fiftyone import ViewField as F

    views: dict[str, Any] = {VIEW_EDGE_CASES: dataset.exists(EDGE_RANK).sort_by(EDGE_RANK)}
    mistakenness = fields.get("mistakenness")
    labelled = dataset.exists("ground_truth")
    views[VIEW_MISLABELED] = (
        labelled.exists(mistakenness).sort_by(mistakenness, reverse=True).limit(config.mislabeled_top)
        if mistakenness
        else labelled.limit(0)
    )
    views[VIEW_NEAR_DUPLICATES] = (
        dataset.exists(NEAR_DUPLICATE_FIELD).sort_by(NEAR_DUPLICATE_FIELD)
        if NEAR_DUPLICATE_FIELD in dataset.get_field_schema()
        else dataset.limit(0)
    )
    for batch_id in drifted_batches:
        views[drift_view_name(batch_id)] = (
            dataset.match_tags(GROUP_PRODUCTION).match(F("batch_id") == batch_id).sort_by("prediction.confidence")
        )
    for name in dataset.list_saved_views():
        if name.startswith(DRIFT_VIEW_PREFIX) and name not in views:
            dataset.delete_saved_view(name)
    counts = {}
    for name, view in views.items():
        dataset.save_view(name, view, overwrite=True)
        counts[name] = len(view)
    return counts


def drift_view_name(batch_id: str) -> str:
    """``drift_<batch_id>``."""
    return f"{DRIFT_VIEW_PREFIX}{batch_id}"


def view_counts(dataset: fo.Dataset) -> dict[str, int]:
    """Every saved view -> its sample count (what ``cvops status`` shows)."""
    return {name: len(dataset.load_saved_view(name)) for name in sorted(dataset.list_saved_views())}


def edge_case_preview(dataset: fo.Dataset, limit: int = 12, cell: int = 56) -> tuple[bytes | None, list[dict[str, Any]]]:
    """The top edge cases: a thumbnail strip (PNG) and one row each (file, batch, prediction,
    confidence, reasons). ``(None, [])`` when there is none."""
    from PIL import Image

    from cvops_dagster.datasets.thumbnails import ThumbnailConfig, grid_png
    from cvops_dagster.imaging.decode import decode_image
    from cvops_dagster.imaging.policy import DecodeConfig

    view = dataset.exists(EDGE_RANK).sort_by(EDGE_RANK).limit(limit)
    if not len(view):
        return None, []
    paths, files, batches, labels, confidence, reasons = view.values(
        ["filepath", "source_path", "batch_id", "prediction.label", "prediction.confidence", EDGE_REASONS]
    )
    images = []
    for path in paths:
        try:  # the cleaning decoder (allowed formats, pixel limit): production files are untrusted
            with open(path, "rb") as handle:
                thumb = decode_image(handle.read(), DecodeConfig()).image.convert("RGB")
            thumb.thumbnail((cell, cell))
            images.append(thumb)
        except Exception:  # noqa: BLE001 - an image that does not open is only not shown
            images.append(Image.new("RGB", (cell, cell), (200, 200, 200)))
    config = ThumbnailConfig(per_group=len(images), cell=cell)
    png = grid_png([("edge cases", images)], config)
    rows = [
        {"file": f, "batch": b, "predicted": lab, "confidence": c, "reasons": ", ".join(r or [])}
        for f, b, lab, c, r in zip(files, batches, labels, confidence, reasons, strict=True)
    ]
    return png, rows
