"""Reviewers' relabel/discard decisions applied to ingested records (pure; no FiftyOne)."""

from __future__ import annotations

import pandas as pd
import pytest

from cvops_dagster.datasets.review_decisions import DECISION_COLUMNS, apply_review_decisions


def _records() -> pd.DataFrame:
    return pd.DataFrame({
        "record_id": ["b1/3/a.png", "b2/3/a_copy.png", "b1/5/b.png", "b1/7/c.png"],
        "sample_id": ["sa", "sa", "sb", "sc"],
        "label": ["3", "3", "5", "7"],
    })  # fmt: skip


def _decisions(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame([dict(zip(DECISION_COLUMNS, row, strict=True)) for row in rows], columns=DECISION_COLUMNS)


def test_no_decisions_change_nothing() -> None:
    applied = apply_review_decisions(_records(), None)
    assert applied.records["label"].tolist() == ["3", "3", "5", "7"]
    assert not applied.discarded.any() and applied.overrides == []


def test_relabel_changes_every_record_of_the_image_and_records_each_override() -> None:
    applied = apply_review_decisions(_records(), _decisions(("sa", "relabel", "8", "fiftyone", "reviewed", "2026-01-01T00:00:00")))
    assert applied.records["label"].tolist() == ["8", "8", "5", "7"]
    assert [(o["record_id"], o["old_label"], o["new_label"]) for o in applied.overrides] == [
        ("b1/3/a.png", "3", "8"), ("b2/3/a_copy.png", "3", "8"),
    ]  # fmt: skip
    assert applied.summary()["discarded"] == 0


def test_a_confirming_review_is_counted_not_recorded_as_override() -> None:
    applied = apply_review_decisions(_records(), _decisions(("sb", "relabel", "5", "fiftyone", "reviewed", "t")))
    assert applied.confirmed == 1 and applied.overrides == []


def test_discard_wins_over_relabel_and_keeps_the_records() -> None:
    decisions = _decisions(
        ("sc", "relabel", "1", "fiftyone", "reviewed", "2026-01-01T00:00:00"),
        ("sc", "discard", None, "fiftyone", "discard", "2026-01-01T00:00:01"),
    )
    applied = apply_review_decisions(_records(), decisions)
    assert applied.discarded.tolist() == [False, False, False, True]
    assert "fiftyone" in applied.discard_detail[3]
    assert applied.records["label"].tolist() == ["3", "3", "5", "7"]  # nothing relabelled, nothing dropped
    assert len(applied.records) == 4


def test_the_latest_relabel_of_an_image_wins() -> None:
    decisions = _decisions(
        ("sb", "relabel", "9", "fiftyone", "reviewed", "2026-01-02T00:00:00"),
        ("sb", "relabel", "4", "fiftyone", "reviewed", "2026-01-01T00:00:00"),
    )
    assert apply_review_decisions(_records(), decisions).records["label"].tolist()[2] == "9"


def test_unmatched_decisions_are_counted() -> None:
    applied = apply_review_decisions(_records(), _decisions(("zz", "discard", None, "fiftyone", "discard", "t")))
    assert applied.unmatched == 1 and not applied.discarded.any()


@pytest.mark.parametrize("row", [("sa", "explode", "1", "x", "t", "t"), ("sa", "relabel", None, "x", "t", "t")])
def test_bad_decisions_are_refused(row: tuple) -> None:
    with pytest.raises(ValueError):
        apply_review_decisions(_records(), _decisions(row))
