"""Great Expectations validation of a cleaned dataset's manifest.

Kept apart from cleaning so it can run as a blocking asset check: cleaning produces the
manifest, :func:`validate_dataset` judges it. Everything is a GX expectation, run in an
ephemeral context (no project folder) over a pandas datasource with three tables:

- ``records``: every manifest row (one per ingested record): record ids non-null and
  unique, outcomes from the allowed set;
- ``samples``: the clean rows: sample ids non-null and unique, canonical width/height
  within bounds, canonical mode allowed, labels non-null and in the label set;
- ``classes``: derived, one row per label with its clean count and its ratio to the
  largest class: every class at least ``min_class_count`` (GX has no per-group count
  expectation, hence the derived table), the ratio at least ``min_class_ratio`` (class
  balance), and at least ``min_classes`` classes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from cvops_dagster.core.contracts import OUTCOMES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationConfig:
    """Bounds the dataset must meet.

    Attributes:
        min_width, max_width, min_height, max_height: canonical size bounds in pixels.
        allowed_modes: canonical modes allowed.
        labels: the expected label set; ``None`` accepts any non-blank label name.
        min_class_count: clean samples every class needs.
        min_class_ratio: smallest class size over largest class size (balance).
        min_classes: number of classes needed (a classifier needs two).
        examples: failing examples kept per expectation.
    """

    min_width: int = 8
    max_width: int = 4096
    min_height: int = 8
    max_height: int = 4096
    allowed_modes: tuple[str, ...] = ("L", "RGB")
    labels: tuple[str, ...] | None = None
    min_class_count: int = 5
    min_class_ratio: float = 0.2
    min_classes: int = 2
    examples: int = 5


@dataclass
class ExpectationOutcome:
    """The result of one expectation."""

    expectation: str
    table: str
    column: str | None
    success: bool
    element_count: int | None = None
    unexpected_count: int | None = None
    observed_value: Any = None
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_dataset`.

    Attributes:
        success: every expectation passed.
        results: one entry per expectation, with a few failing examples.
        statistics: counts of expectations and summary figures of the data.
    """

    success: bool
    results: list[ExpectationOutcome]
    statistics: dict[str, Any]

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for metadata and the check's description)."""
        return {"success": self.success, "statistics": self.statistics, "results": [asdict(r) for r in self.results]}


def class_table(manifest_df: pd.DataFrame) -> pd.DataFrame:
    """Per-label clean counts and ratio to the largest class (the derived ``classes`` table)."""
    clean = manifest_df[manifest_df["outcome"] == "clean"] if len(manifest_df) else manifest_df
    counts = clean["label"].value_counts().sort_index() if len(clean) else pd.Series(dtype="int64")
    table = pd.DataFrame({"label": counts.index.astype(str), "count": counts.to_numpy(dtype="int64")})
    largest = int(table["count"].max()) if len(table) else 0
    table["ratio_to_largest"] = table["count"] / largest if largest else 0.0
    return table


def _suites(config: ValidationConfig) -> dict[str, list[Any]]:
    import great_expectations as gx

    ex = gx.expectations
    label_check = (
        ex.ExpectColumnValuesToBeInSet(column="label", value_set=list(config.labels))
        if config.labels is not None
        else ex.ExpectColumnValuesToMatchRegex(column="label", regex=r"^\S(?:.*\S)?$")
    )
    return {
        "records": [
            ex.ExpectColumnValuesToNotBeNull(column="record_id"),
            ex.ExpectColumnValuesToBeUnique(column="record_id"),
            ex.ExpectColumnValuesToBeInSet(column="outcome", value_set=list(OUTCOMES)),
        ],
        "samples": [
            ex.ExpectColumnValuesToNotBeNull(column="sample_id"),
            ex.ExpectColumnValuesToBeUnique(column="sample_id"),
            ex.ExpectColumnValuesToBeBetween(column="width", min_value=config.min_width, max_value=config.max_width),
            ex.ExpectColumnValuesToBeBetween(column="height", min_value=config.min_height, max_value=config.max_height),
            ex.ExpectColumnValuesToBeInSet(column="canonical_mode", value_set=list(config.allowed_modes)),
            ex.ExpectColumnValuesToNotBeNull(column="label"),
            label_check,
        ],
        "classes": [
            ex.ExpectTableRowCountToBeBetween(min_value=config.min_classes),
            ex.ExpectColumnValuesToBeBetween(column="count", min_value=config.min_class_count),
            ex.ExpectColumnValuesToBeBetween(column="ratio_to_largest", min_value=config.min_class_ratio),
        ],
    }


_ID_COLUMN = {"records": "record_id", "samples": "sample_id", "classes": "label"}


def _outcome(table: str, frame: pd.DataFrame, result: Any, examples: int) -> ExpectationOutcome:
    cfg = result.expectation_config
    details = dict(result.result or {})
    column = cfg.kwargs.get("column")
    found: list[dict[str, Any]] = []
    if not result.success:
        values = details.get("partial_unexpected_list") or []
        indices = details.get("partial_unexpected_index_list") or []
        id_column = _ID_COLUMN[table]
        for position, value in list(zip(indices, values))[:examples]:
            example = {"value": None if pd.isna(value) else value}
            if isinstance(position, int) and 0 <= position < len(frame):
                example[id_column] = frame[id_column].iloc[position]
            found.append(example)
    observed = details.get("observed_value")
    return ExpectationOutcome(
        expectation=cfg.type,
        table=table,
        column=column,
        success=bool(result.success),
        element_count=details.get("element_count"),
        unexpected_count=details.get("unexpected_count"),
        observed_value=observed.item() if hasattr(observed, "item") else observed,
        examples=found,
    )


def validate_dataset(manifest_df: pd.DataFrame, config: ValidationConfig = ValidationConfig()) -> ValidationReport:
    """Run the dataset's expectation suites with Great Expectations.

    Args:
        manifest_df: a cleaned-dataset manifest (``datasets/<version>/manifest.parquet``).
        config: bounds and label set.

    Returns:
        The report: overall success, per-expectation outcomes with failing examples, and
        statistics (expectation counts, rows, clean samples, classes, smallest class).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    records = manifest_df.reset_index(drop=True)
    samples = records[records["outcome"] == "clean"].reset_index(drop=True)
    classes = class_table(records)
    tables = {"records": records, "samples": samples, "classes": classes}

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("cvops_dataset")
    results: list[ExpectationOutcome] = []
    for table, expectations in _suites(config).items():
        frame = tables[table]
        batch_definition = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=f"cleaned_dataset_{table}", expectations=expectations))
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        run = batch.validate(
            suite,
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": max(config.examples, 1),
                "include_unexpected_rows": False,
            },
        )
        results.extend(_outcome(table, frame, r, config.examples) for r in run.results)

    passed = sum(r.success for r in results)
    statistics = {
        "evaluated_expectations": len(results),
        "successful_expectations": passed,
        "unsuccessful_expectations": len(results) - passed,
        "records": len(records),
        "clean_samples": len(samples),
        "classes": len(classes),
        "smallest_class": int(classes["count"].min()) if len(classes) else 0,
        "largest_class": int(classes["count"].max()) if len(classes) else 0,
    }
    report = ValidationReport(success=passed == len(results), results=results, statistics=statistics)
    if not report.success:
        logger.warning(
            "dataset validation failed: %s",
            ", ".join(f"{r.table}.{r.column or ''}:{r.expectation}" for r in report.failed),
        )
    return report
