"""Great Expectations suite over the manifest: passes on a good table, names each failure."""

from __future__ import annotations

import pandas as pd
import pytest

from cvops_dagster.datasets.validation import ValidationConfig, class_table, validate_dataset


def _manifest(per_class: dict[str, int]) -> pd.DataFrame:
    rows = []
    for label, count in per_class.items():
        for i in range(count):
            rows.append(
                {
                    "record_id": f"b/{label}/{i}.png",
                    "sample_id": f"{label}-{i}",
                    "label": label,
                    "outcome": "clean",
                    "width": 32,
                    "height": 32,
                    "canonical_mode": "L",
                }
            )
    rows.append(
        {"record_id": "b/x/bad.png", "sample_id": "bad", "label": "0", "outcome": "quarantined",
         "width": None, "height": None, "canonical_mode": None}
    )
    return pd.DataFrame(rows)


CONFIG = ValidationConfig(labels=("0", "1", "2"), min_class_count=5, min_class_ratio=0.5)


def _failed(report) -> set[tuple[str, str | None, str]]:
    return {(r.table, r.column, r.expectation) for r in report.failed}


def test_good_manifest_passes() -> None:
    report = validate_dataset(_manifest({"0": 10, "1": 8, "2": 9}), CONFIG)
    assert report.success, report.to_dict()
    assert report.statistics["clean_samples"] == 27
    assert report.statistics["smallest_class"] == 8
    assert report.statistics["evaluated_expectations"] == len(report.results) >= 12


def test_each_broken_property_fails_its_expectation_with_examples() -> None:
    frame = _manifest({"0": 10, "1": 8, "2": 9})
    frame.loc[1, "sample_id"] = frame.loc[0, "sample_id"]  # duplicate id
    frame.loc[2, "width"] = 100_000  # out of bounds
    frame.loc[3, "canonical_mode"] = "CMYK"
    frame.loc[4, "label"] = "9"  # outside the label set
    report = validate_dataset(frame, CONFIG)
    assert not report.success
    failed = _failed(report)
    assert ("samples", "sample_id", "expect_column_values_to_be_unique") in failed
    assert ("samples", "width", "expect_column_values_to_be_between") in failed
    assert ("samples", "canonical_mode", "expect_column_values_to_be_in_set") in failed
    assert ("samples", "label", "expect_column_values_to_be_in_set") in failed
    width = next(r for r in report.failed if r.column == "width")
    assert width.unexpected_count == 1
    assert width.examples[0]["value"] == 100_000
    assert width.examples[0]["sample_id"] == frame.loc[2, "sample_id"]


@pytest.mark.parametrize(
    ("per_class", "column"),
    [({"0": 6, "1": 4, "2": 6}, "count"), ({"0": 40, "1": 10, "2": 38}, "ratio_to_largest")],
)
def test_class_minimum_and_balance(per_class: dict[str, int], column: str) -> None:
    report = validate_dataset(_manifest(per_class), CONFIG)
    failed = [r for r in report.failed if r.table == "classes"]
    assert [r.column for r in failed] == [column]
    assert failed[0].examples[0]["label"] == "1"


def test_a_single_class_fails_the_class_count() -> None:
    report = validate_dataset(_manifest({"0": 10}), ValidationConfig())
    assert ("classes", None, "expect_table_row_count_to_be_between") in _failed(report)


def test_class_table_counts_only_clean_rows() -> None:
    table = class_table(_manifest({"0": 4, "1": 2}))
    assert table.set_index("label")["count"].to_dict() == {"0": 4, "1": 2}
    assert table.set_index("label")["ratio_to_largest"].to_dict() == {"0": 1.0, "1": 0.5}
