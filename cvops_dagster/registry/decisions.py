"""Gate decisions: what ``production_model`` decided, recorded before anything is published.

A decision is one immutable object, ``production/decisions/<decision_id>.json``: the challenger,
the champion it was weighed against (and the last history event the gate saw), the metrics of
both on the current test split and its ``previous``/``new`` slices, the verdict and its reason,
and the no-regression check. ``onnx_runtime`` reads it back by id
(:mod:`cvops_dagster.serving.publication`) and publishes it only if production is still what
the decision saw.

The id is a hash of the decision's inputs (kind, challenger, champion, last history event,
dataset version, settings), so re-running the gate on unchanged inputs finds the recorded
decision instead of evaluating both models again.

Plain JSON and the standard library: serving reads decisions without loading torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.registry.history import ProductionStateError, read_record

DECISIONS_PREFIX = "production/decisions"
KINDS = ("promote", "keep", "rollback")


@dataclass(frozen=True)
class Decision:
    """One gate decision.

    Attributes:
        decision_id: hash of the inputs (see the module docstring).
        kind: ``promote`` (the challenger replaces the champion), ``keep`` (the champion stays)
            or ``rollback`` (the previous champion comes back).
        target_model_id: the model that serves once the decision is published.
        challenger_id: the model weighed (``None`` for a rollback).
        champion_id: the champion when the decision was made: the publisher's precondition.
        last_event_id: the last applied history event the gate saw.
        dataset_version: the dataset whose test split the models were scored on (``None`` for a
            rollback, which scores nothing).
        reason: the verdict, in words, with the figures.
        metrics: ``{"challenger"|"champion": {"all"|"previous"|"new": {accuracy, macro_f1, n}}}``.
        no_regression: ``{passed, slice, target_accuracy, champion_accuracy, tolerance, reason}``.
        decided_at: ISO-8601 UTC.
        target_model_hash: the target's weights SHA-256 (model card), when known.
        target_dataset_version: the dataset the target's runtime is checked on.
        target_metrics: the target's figures recorded in the history when it is published.
        margin: the gate margin used.
    """

    decision_id: str
    kind: str
    target_model_id: str
    challenger_id: str | None
    champion_id: str | None
    last_event_id: str | None
    dataset_version: str | None
    reason: str
    metrics: dict[str, Any]
    no_regression: dict[str, Any]
    decided_at: str
    target_model_hash: str | None = None
    target_dataset_version: str | None = None
    target_metrics: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.0

    @property
    def promoted(self) -> bool:
        """Whether the gate promoted the challenger."""
        return self.kind == "promote"

    @property
    def check_passed(self) -> bool:
        """Whether ``check_production_model_no_regression`` holds for this decision."""
        return bool(self.no_regression.get("passed"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``production/decisions/<decision_id>.json``."""
        return asdict(self)


def decision_id(**inputs: Any) -> str:
    """``d-`` + the first 20 hex of the SHA-256 of the inputs (as sorted JSON)."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return "d-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def decision_key(decision_id: str) -> str:
    """Storage key of a decision."""
    return f"{DECISIONS_PREFIX}/{decision_id}.json"


def write_decision(storage: ArtifactStorage, decision: Decision) -> str:
    """Record ``decision`` (atomically, under its own id); returns its URI."""
    return storage.write_json(decision_key(decision.decision_id), decision.to_dict())


def read_decision(storage: ArtifactStorage, decision_id: str) -> Decision:
    """The recorded decision ``decision_id``.

    Raises:
        FileNotFoundError: no such decision.
        ProductionStateError: the file is truncated or invalid (naming it and what to do).
    """
    key = decision_key(decision_id)
    if not storage.exists(key):
        raise FileNotFoundError(f"decision {decision_id} not found ({storage.uri(key)} missing); materialize production_model again")
    remedy = "materialize production_model again (`cvops run --select production_model+`) to record a new decision"
    record = read_record(storage, key, remedy=remedy)
    names = {f.name for f in fields(Decision)}
    required = [f.name for f in fields(Decision) if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in record]
    if missing or record.get("kind") not in KINDS:
        raise ProductionStateError(f"{storage.uri(key)}: not a gate decision (missing {missing} or unknown kind); {remedy}")
    return Decision(**{k: v for k, v in record.items() if k in names})
