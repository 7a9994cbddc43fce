"""Outcomes of cleaning: every record clean, duplicate or quarantined, and the dataset mode.

Records come in ingestion order, so the first of a duplicate group is the copy kept and adding
a batch never replaces an existing clean sample. A duplicate group whose records disagree on
the label is quarantined whole (``label_conflict``); a decodable record without a label is
quarantined as ``no_label``; a record without a file as ``missing_image``. Clean records get
their split (a function of sample id and label, see :mod:`cvops_dagster.datasets.splits`).

Dataset mode rule: "RGB" when more than ``rgb_fraction`` of the distinct decodable images are
colour, else "L" (unless the configuration forces one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cvops_dagster.datasets.duplicates import find_duplicates
from cvops_dagster.datasets.splits import assign_splits
from cvops_dagster.imaging.facts import compare_stack
from cvops_dagster.imaging.policy import REASON_MISSING

if TYPE_CHECKING:
    from cvops_dagster.datasets.cleaning import CleaningConfig

REASON_NO_LABEL = "no_label"
REASON_LABEL_CONFLICT = "label_conflict"


@dataclass
class Outcomes:
    """The decision for every record (object arrays, one entry per record) and the mode."""

    outcome: np.ndarray
    reason: np.ndarray
    detail: np.ndarray
    alias_of: np.ndarray
    split: np.ndarray
    mode: str

    @property
    def clean(self) -> np.ndarray:
        return np.flatnonzero(self.outcome == "clean")


def decide_outcomes(records: pd.DataFrame, facts: pd.DataFrame, config: CleaningConfig) -> Outcomes:
    """Outcome, reason, alias and split of every record, and the dataset mode.

    Args:
        records: see :func:`~cvops_dagster.datasets.cleaning.ingested_records` (ingestion
            order: the earliest copy is kept).
        facts: the decode facts of each record's file (all null without a file).
        config: cleaning settings.
    """
    n = len(records)
    ok = facts["ok"].to_numpy(dtype=bool)
    labelled = records["label"].notna().to_numpy()
    has_file = records["row"].to_numpy() >= 0
    reason = facts["reason"].to_numpy(dtype=object, na_value=None).copy()
    detail = facts["reason_detail"].to_numpy(dtype=object, na_value=None).copy()
    reason[~has_file], detail[~has_file] = REASON_MISSING, "record has no image_key"
    reason[ok & ~labelled], detail[ok & ~labelled] = REASON_NO_LABEL, "ingested record has no label"
    outcome = np.full(n, "quarantined", dtype=object)
    alias_of = np.full(n, None, dtype=object)
    split = np.full(n, None, dtype=object)

    eligible = np.flatnonzero(ok & labelled)
    pixel_hashes = facts["pixel_hash"].to_numpy(dtype=object, na_value=None)[eligible]
    mode = config.mode or _dataset_mode(pixel_hashes, facts["canonical_mode"].to_numpy(dtype=object)[eligible], config)
    keep, kind = find_duplicates(
        pixel_hashes.tolist(),
        facts["phash"].to_numpy(dtype=np.uint64, na_value=0)[eligible],
        compare_stack(facts["compare"].iloc[eligible]),
        config.near_duplicates,
    )
    labels = records["label"].to_numpy(dtype=object)[eligible]
    conflict = _conflicting(keep, labels)
    for target in np.unique(keep[conflict]).tolist():
        members = conflict & (keep == target)
        reason[eligible[members]] = REASON_LABEL_CONFLICT
        detail[eligible[members]] = f"duplicates carry labels {sorted(set(labels[members].tolist()))}"
    kept = (keep == np.arange(len(keep))) & ~conflict
    duplicate = (keep != np.arange(len(keep))) & ~conflict
    clean_rows, dup_rows = eligible[kept], eligible[duplicate]
    sample_ids = records["sample_id"].to_numpy(dtype=object)
    outcome[clean_rows], reason[clean_rows], detail[clean_rows] = "clean", None, None
    outcome[dup_rows], reason[dup_rows], detail[dup_rows] = "duplicate", np.asarray(kind, dtype=object)[duplicate], None
    alias_of[dup_rows] = sample_ids[eligible[keep[duplicate]]]
    split[clean_rows] = assign_splits([str(s) for s in sample_ids[clean_rows]], labels[kept].tolist(), config.splits)
    return Outcomes(outcome, reason, detail, alias_of, split, mode)


def _dataset_mode(pixel_hashes: np.ndarray, modes: np.ndarray, config: CleaningConfig) -> str:
    """RGB when more than ``rgb_fraction`` of the distinct decodable images are colour."""
    distinct = dict(zip(pixel_hashes.tolist(), modes.tolist(), strict=True))  # one mode per pixel hash
    colour = sum(mode == "RGB" for mode in distinct.values()) / len(distinct) if distinct else 0.0
    return "RGB" if colour > config.rgb_fraction else "L"


def _conflicting(keep: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: its duplicate group (``keep``) holds more than one label."""
    frame = pd.DataFrame({"group": keep, "label": labels})
    labels_per_group = frame.groupby("group")["label"].nunique()
    return (labels_per_group.reindex(keep).to_numpy() > 1) if len(keep) else np.zeros(0, dtype=bool)
