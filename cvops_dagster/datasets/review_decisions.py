"""Reviewers' decisions about images already in the data: relabel or discard, never silently.

The review (FiftyOne, read by ``review_feedback``) can say two things about an image that is
already a training record, keyed by its sample id (the sha256 of its bytes):

- ``relabel``: its label is ``label``. Every record of that image whose label differs takes the
  new label, and the change is recorded as an override (record, old label -> new label, who,
  when) in dataset.json and the asset's metadata. A review that confirms the label is counted.
- ``discard``: the image must not be used for training. Every record of it is quarantined with
  reason ``review_discard`` (the detail names the source and time): the record stays in the
  manifest, so nothing is lost and the accounting still adds up.

A discard wins over a relabel of the same image. Decisions naming no record are counted as
``unmatched`` (an image reviewed before it ever reached the data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

REASON_REVIEW_DISCARD = "review_discard"
ACTION_RELABEL = "relabel"
ACTION_DISCARD = "discard"
DECISION_COLUMNS = ["sample_id", "action", "label", "source", "tag", "reviewed_at"]


@dataclass
class AppliedReview:
    """Decisions applied to the ingested records.

    Attributes:
        records: the records with relabels applied (a copy).
        discarded: per record, whether a discard decision removes it.
        discard_detail: per record, the quarantine detail of a discarded one.
        overrides: one entry per relabelled record.
        confirmed: relabel decisions that agreed with every record's label.
        unmatched: decisions naming no record.
    """

    records: pd.DataFrame
    discarded: np.ndarray
    discard_detail: np.ndarray
    overrides: list[dict[str, Any]] = field(default_factory=list)
    confirmed: int = 0
    unmatched: int = 0

    def summary(self) -> dict[str, Any]:
        """What dataset.json records under ``review``."""
        return {
            "overrides": self.overrides,
            "discarded": int(self.discarded.sum()),
            "confirmed": self.confirmed,
            "unmatched": self.unmatched,
        }


def apply_review_decisions(records: pd.DataFrame, decisions: pd.DataFrame | None) -> AppliedReview:
    """Apply ``decisions`` (columns :data:`DECISION_COLUMNS`) to ``records`` (``record_id``,
    ``sample_id``, ``label``); see the module docstring.

    Raises:
        ValueError: a decision has an unknown action, or a relabel has no label.
    """
    records = records.copy()
    n = len(records)
    discarded = np.zeros(n, dtype=bool)
    detail = np.full(n, None, dtype=object)
    applied = AppliedReview(records, discarded, detail)
    if decisions is None or not len(decisions):
        return applied
    unknown = sorted(set(decisions["action"]) - {ACTION_RELABEL, ACTION_DISCARD})
    if unknown:
        raise ValueError(f"review decisions with unknown action(s) {unknown}")
    sample_ids = records["sample_id"].astype(object).to_numpy()
    labels = records["label"].to_numpy(dtype=object).copy()
    by_sample: dict[str, list[int]] = {}
    for i, sample_id in enumerate(sample_ids.tolist()):
        by_sample.setdefault(str(sample_id), []).append(i)
    ordered = decisions.sort_values("reviewed_at", kind="stable", na_position="first")
    latest = ordered.drop_duplicates("sample_id", keep="last").set_index("sample_id")
    discard_ids = set(ordered.loc[ordered["action"] == ACTION_DISCARD, "sample_id"].astype(str))
    for sample_id, decision in latest.iterrows():
        rows = by_sample.get(str(sample_id))
        if not rows:
            applied.unmatched += 1
            continue
        when, source = decision.get("reviewed_at"), decision.get("source")
        if str(sample_id) in discard_ids:
            for i in rows:
                discarded[i] = True
                detail[i] = f"discarded by {source} review at {when}"
            continue
        label = decision.get("label")
        if label is None or pd.isna(label) or not str(label):
            raise ValueError(f"relabel decision for {sample_id} has no label")
        changed = [i for i in rows if labels[i] != str(label)]
        if not changed:
            applied.confirmed += 1
            continue
        for i in changed:
            applied.overrides.append({
                "record_id": str(records["record_id"].iat[i]), "sample_id": str(sample_id),
                "old_label": labels[i], "new_label": str(label), "source": source, "reviewed_at": when,
            })  # fmt: skip
            labels[i] = str(label)
    records["label"] = labels
    applied.records = records
    return applied
