"""The review benchmark runs end to end at a tiny size and reports every figure.

Not a timed test: it checks that the figures are produced and consistent (the update pass
leaves exactly one sample per image, the ratio is a number), not how fast. FiftyOne runs on
the test session's database (tests/conftest.py), which the bench then reuses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cvops_dagster.bench.review import EMBEDDING_DIM, LABELS, bench_review, generate_rows
from cvops_dagster.monitoring.predictions import NUMERIC_FEATURES
from cvops_dagster.review.connection import configure, database_from_env
from cvops_dagster.review.samples import ROW_COLUMNS

IMAGES = 200

FIGURES = {
    "images", "batches", "review_build_seconds", "review_update_seconds", "add_samples_seconds",
    "add_samples_call_seconds", "review_vs_add_samples_ratio", "update_vs_add_samples_ratio", "review_target_ratio",
    "review_target_met", "all_review_build_seconds", "all_review_update_seconds", "all_add_samples_seconds",
    "build_added", "update_added", "update_updated", "samples_after_build", "samples_after_update",
    "distinct_keys_after_update", "update_applied", "same_documents", "schema_differences", "brain_seconds",
    "brain_run_seconds", "views_seconds", "view_counts", "edge_criteria", "rows_seconds", "media_seconds", "repeats",
    "cpu_count", "fiftyone_database", "mongod_dbpath",
}  # fmt: skip


def test_embedding_width_is_the_default_models() -> None:
    from cvops_dagster.training.models import DEFAULT_ARCH

    assert EMBEDDING_DIM == DEFAULT_ARCH["widths"][-1]


def test_generated_rows_have_production_shapes(tmp_path: Path) -> None:
    data = generate_rows(tmp_path, 40, batches=4)
    rows, changed = data["rows"], data["changed"]
    assert list(rows.columns) == ROW_COLUMNS and len(rows) == 40 and rows["key"].is_unique
    assert list(changed["key"]) == list(rows["key"])
    assert set(rows["predicted_label"]) <= set(LABELS) and rows["batch_id"].nunique() == 4
    assert all(np.asarray(v).shape == (len(LABELS),) and np.asarray(v).dtype == np.float32 for v in rows["logits"])
    assert all(np.asarray(v).shape == (EMBEDDING_DIM,) and np.asarray(v).dtype == np.float32 for v in rows["embedding"])
    assert not rows[list(NUMERIC_FEATURES)].isna().any().any()
    assert changed["ground_truth"].notna().sum() > rows["ground_truth"].notna().sum() > 0
    assert (changed["model_id"] != rows["model_id"]).all()
    assert all(Path(p).is_file() and p.endswith(".png") for p in data["filepaths"])


def test_review_bench_figures() -> None:
    import fiftyone as fo

    configure(database_from_env())  # the session's database: the bench must reuse it
    before = set(fo.list_datasets())
    figures = bench_review(images=IMAGES, repeats=1, batches=8)

    assert FIGURES <= set(figures)
    assert figures["images"] == IMAGES and figures["repeats"] == 1 and figures["batches"] == 8
    assert figures["temporary_database"] is False
    # The build adds every row; the update changes them in place: no duplicates.
    assert figures["build_added"] == figures["samples_after_build"] == IMAGES
    assert figures["update_added"] == 0 and figures["update_updated"] == IMAGES
    assert figures["samples_after_update"] == figures["distinct_keys_after_update"] == IMAGES
    assert figures["update_applied"] is True
    assert figures["same_documents"] is True
    for name in ("review_vs_add_samples_ratio", "update_vs_add_samples_ratio", "brain_seconds", "views_seconds"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert set(figures["brain_run_seconds"]) == {"hardness", "mistakenness", "uniqueness", "similarity", "visualization"}
    assert set(figures["view_counts"]) >= {"edge_cases", "likely_mislabeled", "near_duplicates", "drift_bench_003"}
    assert set(fo.list_datasets()) == before  # every dataset it made is gone
