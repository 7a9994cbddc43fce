"""Writing review rows into the persistent FiftyOne dataset: an upsert, in bulk.

Each row (:mod:`cvops_dagster.review.samples`) is keyed by ``cvops_key``. :func:`upsert_rows`
reads the keys already in the dataset once, adds the new rows with one ``add_samples`` call and
updates the existing ones field by field with ``set_values(..., key_field="cvops_key")``: no
per-sample ``save()``, and re-building never duplicates a sample.

What a reviewer wrote is never overwritten: a sample tagged ``reviewed`` or ``discard`` keeps
its ``ground_truth`` and tags. Test-split samples of an older dataset version that nobody
reviewed are removed (the group holds the current version's test split); reviewed ones stay
until their review has been read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cvops_dagster.monitoring.predictions import NUMERIC_FEATURES
from cvops_dagster.review.samples import GROUP_TEST

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

KEY_FIELD = "cvops_key"
#: The review protocol's tags (DESIGN.md): set by a reviewer in the App, read back by review_feedback.
TAG_REVIEWED = "reviewed"
TAG_DISCARD = "discard"
REVIEW_TAGS = (TAG_REVIEWED, TAG_DISCARD)

#: Plain fields copied from a row to its sample (the row column has the same name).
PLAIN_FIELDS = ("cvops_sample_id", "image_key", "batch_id", "source_path", "model_id", "dataset_version", "drift_batch", *NUMERIC_FEATURES)


@dataclass(frozen=True)
class UpsertResult:
    """What :func:`upsert_rows` changed: samples added, updated and removed (stale test split)."""

    added: int
    updated: int
    removed: int


def upsert_rows(dataset: fo.Dataset, rows: pd.DataFrame, filepaths: list[str]) -> UpsertResult:
    """Add or update one sample per row (see the module docstring).

    Args:
        dataset: the review dataset.
        rows: review rows (``ROW_COLUMNS``), keys unique.
        filepaths: the local media path of each row's image, in order.
    """
    import fiftyone as fo

    if rows["key"].duplicated().any():
        raise ValueError("review rows repeat a key")
    _ensure_fields(dataset)
    plain = ["filepath", *PLAIN_FIELDS]
    columns = dataset.values([KEY_FIELD, "tags", *plain]) if len(dataset) else [[] for _ in range(2 + len(plain))]
    existing_keys, existing_tags = columns[0], columns[1]
    known = {k: set(t or ()) for k, t in zip(existing_keys, existing_tags, strict=True) if k is not None}
    stored = {name: dict(zip(existing_keys, values, strict=True)) for name, values in zip(plain, columns[2:], strict=True)}
    is_new = ~rows["key"].isin(list(known)).to_numpy()
    rows = rows.assign(filepath=filepaths, cvops_sample_id=rows["sample_id"])

    new = rows[is_new]
    if len(new):
        dataset.add_samples([_sample(fo, row) for row in new.to_dict(orient="records")], progress=False)

    old = rows[~is_new]
    if len(old):
        keys = old["key"].tolist()

        def by_key(values: list[Any]) -> dict[str, Any]:
            return dict(zip(keys, values, strict=True))

        # Plain fields: only the values that changed (a routine rebuild changes few).
        for name in plain:
            changed = {k: v for k, v in zip(keys, (_plain(v) for v in old[name].tolist()), strict=True) if stored[name].get(k) != v}
            if changed:
                dataset.set_values(name, changed, key_field=KEY_FIELD)
        dataset.set_values("embedding", by_key([np.asarray(v, dtype=np.float32) for v in old["embedding"]]), key_field=KEY_FIELD)
        dataset.set_values(
            "prediction", by_key([_prediction(fo, r) for r in old.to_dict(orient="records")]), key_field=KEY_FIELD
        )
        # A reviewer's ground truth is theirs: only unreviewed samples follow the known labels.
        unreviewed = old[[not (known[k] & set(REVIEW_TAGS)) for k in keys]]
        if len(unreviewed):
            dataset.set_values(
                "ground_truth",
                dict(zip(unreviewed["key"], [_truth(fo, v) for v in unreviewed["ground_truth"]], strict=True)),
                key_field=KEY_FIELD,
            )

    # The test-split group is the current version's; unreviewed samples of older versions go.
    current = set(rows["key"])
    stale = [k for k, tags in known.items() if k.startswith(f"{GROUP_TEST}:") and k not in current and not tags & set(REVIEW_TAGS)]
    if stale:
        from fiftyone import ViewField as F

        dataset.delete_samples(dataset.match(F(KEY_FIELD).is_in(stale)))
    return UpsertResult(added=int(is_new.sum()), updated=int((~is_new).sum()), removed=len(stale))


def _ensure_fields(dataset: fo.Dataset) -> None:
    """Declare the fields (and an index on the key) once, so set_values and views know their types."""
    import fiftyone as fo

    schema = dataset.get_field_schema()
    declared: dict[str, tuple[Any, dict[str, Any]]] = {
        KEY_FIELD: (fo.StringField, {}),
        "cvops_sample_id": (fo.StringField, {}),
        "image_key": (fo.StringField, {}),
        "batch_id": (fo.StringField, {}),
        "source_path": (fo.StringField, {}),
        "model_id": (fo.StringField, {}),
        "dataset_version": (fo.StringField, {}),
        "drift_batch": (fo.BooleanField, {}),
        "embedding": (fo.VectorField, {}),
        "prediction": (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Classification}),
        "ground_truth": (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Classification}),
        **{name: (fo.FloatField, {}) for name in NUMERIC_FEATURES},
    }
    for name, (ftype, kwargs) in declared.items():
        if name not in schema:
            dataset.add_sample_field(name, ftype, **kwargs)
    if KEY_FIELD not in dataset.list_indexes():
        dataset.create_index(KEY_FIELD, unique=True)


def _sample(fo: Any, row: dict[str, Any]) -> fo.Sample:  # noqa: ANN401 - the fiftyone module
    fields: dict[str, Any] = {name: _plain(row[name]) for name in PLAIN_FIELDS}
    truth = _truth(fo, row["ground_truth"])
    return fo.Sample(
        filepath=row["filepath"],
        tags=[row["group"]],
        cvops_key=row["key"],
        prediction=_prediction(fo, row),
        embedding=np.asarray(row["embedding"], dtype=np.float32),
        **({"ground_truth": truth} if truth is not None else {}),
        **fields,
    )


def _prediction(fo: Any, row: dict[str, Any]) -> fo.Classification:  # noqa: ANN401
    return fo.Classification(
        label=str(row["predicted_label"]),
        confidence=float(row["confidence"]),
        logits=np.asarray(row["logits"], dtype=np.float32),
    )


def _truth(fo: Any, label: Any) -> fo.Classification | None:  # noqa: ANN401
    return fo.Classification(label=str(label)) if label is not None and not pd.isna(label) else None


def _plain(value: Any) -> Any:  # noqa: ANN401
    """A value MongoDB stores: numpy scalars as Python ones, NaN and pandas NA as None."""
    if value is None:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def set_review_label_schema(dataset: fo.Dataset, labels: list[str]) -> bool:
    """Make ``ground_truth`` editable in the App's annotation panel (FiftyOne's label schemas):
    a classification with a dropdown of the served model's ``labels``, activated. Returns
    whether it was set (an App convenience: a FiftyOne that refuses it is logged, never fatal)."""
    if not labels:
        return False
    try:
        schema = dataset.generate_label_schemas(fields="ground_truth", scan_samples=False)
        schema.update(classes=[str(label) for label in labels], component="dropdown")
        dataset.set_label_schemas({**(dataset.label_schemas or {}), "ground_truth": schema})
        if "ground_truth" not in (dataset.active_label_schemas or []):
            dataset.activate_label_schemas("ground_truth")
        return True
    except Exception as exc:  # noqa: BLE001 - reviewers can still edit through the SDK
        logger.warning("review: no annotation schema for ground_truth (%s: %s)", type(exc).__name__, exc)
        return False
