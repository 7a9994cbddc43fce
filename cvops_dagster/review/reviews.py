"""Reading reviews back from FiftyOne: the ``fiftyone`` source of ``review_feedback``.

The review protocol (DESIGN.md): a reviewer sets ``ground_truth`` on a sample and tags it
``reviewed``; the tag ``discard`` keeps an image out of training. Only samples with one of
those tags are read. What each becomes:

- ``reviewed`` production image with a label the model knows -> a labelled record
  (content-addressed image, label, source ``fiftyone``, the sample's ``last_modified_at`` as
  the time it was labelled), which the next ``cleaned_dataset`` takes in like a delayed label;
- ``reviewed`` test-split image -> a ``relabel`` decision: when the label differs from the
  dataset's, the next dataset version records the override (old -> new label);
- ``discard`` (any image) -> a ``discard`` decision: the next dataset version quarantines
  every record of that image with reason ``review_discard``;
- refused, with a reason: ``reviewed`` without a ground truth (``reviewed_without_label``), a
  label the served model does not know (``label_not_in_model``).

:func:`review_state` is the sensor's cheap summary: how many reviewed/discarded samples, and
the newest review time, so a new or changed review is noticed without reading every sample.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cvops_dagster.datasets.review_decisions import ACTION_DISCARD, ACTION_RELABEL
from cvops_dagster.monitoring.feedback import LabelledRecord, SourceResult
from cvops_dagster.review.connection import open_dataset
from cvops_dagster.review.dataset import KEY_FIELD, REVIEW_TAGS, TAG_DISCARD, TAG_REVIEWED
from cvops_dagster.review.samples import GROUP_PRODUCTION, GROUP_TEST

logger = logging.getLogger(__name__)

SOURCE_FIFTYONE = "fiftyone"
REASON_NO_LABEL = "reviewed_without_label"
REASON_UNKNOWN_LABEL = "label_not_in_model"
REASON_NOT_REVIEWABLE = "not_a_review_sample"


@dataclass(frozen=True)
class FiftyOneReviewSource:
    """The reviews in the review dataset ``dataset_name`` (see the module docstring).

    Attributes:
        dataset_name: the review dataset.
        labels: labels the served model knows (empty: not checked).
    """

    dataset_name: str
    labels: tuple[str, ...] = ()
    name: str = SOURCE_FIFTYONE

    def collect(self) -> SourceResult:
        result = SourceResult()
        dataset = open_dataset(self.dataset_name)
        if dataset is None:
            return result
        view = dataset.match_tags(list(REVIEW_TAGS))
        if not len(view):
            return result
        fields = [
            KEY_FIELD, "cvops_sample_id", "image_key", "batch_id", "source_path", "file_size", "tags",
            "ground_truth.label", "last_modified_at",
        ]  # fmt: skip
        columns = view.values(fields)
        known = set(self.labels)
        batches: set[str] = set()
        for key, sample_id, image_key, batch_id, path, size, tags, label, modified in zip(*columns, strict=True):
            tags = set(tags or ())
            when = _iso(modified)
            group = str(key).split(":", 1)[0] if key else ""

            def refuse(reason: str, detail: str = "") -> None:
                result.quarantined.append({
                    "source": self.name, "batch_id": batch_id or group, "file": path or str(key), "label": label or "",
                    "reason": reason, "detail": detail,
                })  # fmt: skip

            if group not in (GROUP_PRODUCTION, GROUP_TEST) or not sample_id:
                refuse(REASON_NOT_REVIEWABLE, f"sample {key!r} was not added by cvops")
                continue
            if TAG_DISCARD in tags:
                result.decisions.append(_decision(sample_id, ACTION_DISCARD, label, TAG_DISCARD, when))
                continue
            if TAG_REVIEWED not in tags:
                continue
            if not label:
                refuse(REASON_NO_LABEL, "tagged reviewed but ground_truth is empty")
                continue
            if known and label not in known:
                refuse(REASON_UNKNOWN_LABEL, f"the served model knows {sorted(known)}")
                continue
            if group == GROUP_TEST:
                result.decisions.append(_decision(sample_id, ACTION_RELABEL, label, TAG_REVIEWED, when))
                continue
            ext = str(image_key).rsplit(".", 1)[-1] if image_key else ""
            result.records.append(
                LabelledRecord(
                    sample_id=str(sample_id), image_key=str(image_key), ext=ext,
                    size_bytes=int(size) if size is not None else 0, label=str(label), source=self.name,
                    batch_id=str(batch_id), path=str(path), labelled_at=when,
                )
            )  # fmt: skip
            batches.add(str(batch_id))
        result.batches = sorted(batches)
        return result


def _decision(sample_id: str, action: str, label: str | None, tag: str, when: str) -> dict[str, Any]:
    return {"sample_id": str(sample_id), "action": action, "label": label, "source": SOURCE_FIFTYONE, "tag": tag, "reviewed_at": when}


def _iso(value: Any) -> str:  # noqa: ANN401 - a datetime from MongoDB (naive UTC), or None
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return stamp.astimezone(UTC).isoformat(timespec="milliseconds")
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def review_state(dataset_name: str) -> str | None:
    """A short digest of the reviews now (count, newest review time, tags and labels of the
    reviewed samples); ``None`` when the dataset does not exist. It changes when a review is
    added, changed or removed."""
    dataset = open_dataset(dataset_name)
    if dataset is None:
        return None
    view = dataset.match_tags(list(REVIEW_TAGS))
    newest = view.max("last_modified_at") if len(view) else None
    digest = hashlib.sha256()
    keys, tags, labels = view.values([KEY_FIELD, "tags", "ground_truth.label"]) if len(view) else ([], [], [])
    for key, tag, label in sorted(zip(keys, [sorted(set(t or ()) & set(REVIEW_TAGS)) for t in tags], labels, strict=True), key=lambda r: str(r[0])):
        digest.update(f"{key}\0{','.join(tag)}\0{label}\n".encode())
    return f"{len(view)}:{_iso(newest) if newest else '-'}:{digest.hexdigest()[:12]}"
