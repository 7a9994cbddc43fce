"""The retraining policy for drift: which drift events start a retraining, and which wait.

A *drift event* is one production batch (as its images are now) judged drifted against one
served model: ``<batch_id>:<images fingerprint>:<model_id>``. A re-materialized report of the
same batch for the same model is the same event, so it never asks twice.

:func:`decide_retraining` is pure (the sensor gathers the facts from the Dagster instance):

- only *open* events count: the report says drift, its model is still the one served (a new
  champion closes the events of the model it replaced), and no earlier request handled it;
- retraining needs labelled data newer than what the last dataset version included: the
  current ``review_feedback`` version must hold labelled images and must not be one that a
  ``cleaned_dataset`` version already consumed (the champion's, or an earlier retraining's).
  Without it retraining would fit the same data again and is futile: the events *wait*;
- a retraining already in flight means nothing new is requested (its outcome decides);
- otherwise *one* run is requested for every open event at once (two drifted batches in one
  tick are one retraining, not two on the same data), each event recorded as handled by it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DriftEvent:
    """The latest drift verdict of one production batch.

    Attributes:
        event: ``<batch_id>:<fingerprint>:<model_id>``.
        batch_id: the production batch.
        model_id: the served model the batch was judged against.
        drift: the verdict (``None``: too few images for one).
        score, threshold: the report's score and threshold.
        reported_at: when the report was materialized (epoch seconds).
    """

    event: str
    batch_id: str
    model_id: str
    drift: bool | None
    score: float | None
    threshold: float | None
    reported_at: float = 0.0


@dataclass(frozen=True)
class LabelsState:
    """What labelled production data exists, against what datasets already used.

    Attributes:
        feedback_version: the latest ``review_feedback`` version (``None``: never collected).
        labelled_samples: labelled images in it.
        consumed_versions: ``review_feedback`` versions a ``cleaned_dataset`` version included.
    """

    feedback_version: str | None
    labelled_samples: int
    consumed_versions: frozenset[str] = frozenset()

    @property
    def new_labels(self) -> bool:
        """Labelled images that no dataset version has included yet."""
        return bool(self.feedback_version) and self.labelled_samples > 0 and self.feedback_version not in self.consumed_versions


@dataclass(frozen=True)
class RetrainDecision:
    """What the sensor should do now.

    Attributes:
        request: the open events one retraining run should handle (empty: none).
        waiting: open events that want retraining but have no new labels yet.
        reason: one line for the sensor's tick and the run's tags.
    """

    request: tuple[DriftEvent, ...] = ()
    waiting: tuple[DriftEvent, ...] = ()
    reason: str = ""

    @property
    def run_key(self) -> str | None:
        """Tied to the events handled: the same events never make a second run."""
        if not self.request:
            return None
        digest = hashlib.sha256("\n".join(sorted(e.event for e in self.request)).encode()).hexdigest()[:16]
        return f"drift-retrain:{digest}"


def open_events(events: Iterable[DriftEvent], champion: str | None, handled: Iterable[str]) -> list[DriftEvent]:
    """Drifted events of the served model that no request handled yet, oldest first."""
    done = set(handled)
    return sorted(
        (e for e in events if e.drift and champion is not None and e.model_id == champion and e.event not in done),
        key=lambda e: (e.reported_at, e.batch_id),
    )


def decide_retraining(
    events: Sequence[DriftEvent],
    champion: str | None,
    handled: Iterable[str],
    labels: LabelsState,
    in_flight: bool = False,
) -> RetrainDecision:
    """Which drift events start one retraining now, and which wait for labels.

    Args:
        events: the latest report of each production batch.
        champion: the model served now (``None``: nothing served yet).
        handled: events an earlier request already covered.
        labels: the labelled production data and what datasets consumed.
        in_flight: a drift retraining is queued or running.
    """
    pending = open_events(events, champion, handled)
    if not pending:
        return RetrainDecision(reason="no open drift event")
    batches = ", ".join(e.batch_id for e in pending)
    if in_flight:
        return RetrainDecision(waiting=tuple(pending), reason=f"drift on {batches}: a drift retraining is already in flight")
    if not labels.new_labels:
        why = (
            "no labelled production images yet"
            if not labels.labelled_samples
            else f"review_feedback {labels.feedback_version} is already in a dataset version"
        )
        return RetrainDecision(waiting=tuple(pending), reason=f"drift on {batches}; waiting for new labels ({why})")
    scores = ", ".join(f"{e.batch_id} score {e.score:.4f} >= {e.threshold:.4f}" for e in pending if e.score is not None and e.threshold is not None)
    return RetrainDecision(
        request=tuple(pending),
        reason=f"drift on {scores or batches} against model {champion}; {labels.labelled_samples} labelled production "
        f"images in review_feedback {labels.feedback_version}",
    )

