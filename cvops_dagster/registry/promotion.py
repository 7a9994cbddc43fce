"""The champion gate: promote a challenger only if it beats the champion on today's test split.

State lives in the artifact store as JSON:

* ``production/current.json`` — the champion: ``model_id``, ``promoted_at``,
  ``dataset_version``, ``metrics``, ``test_accuracy``.
* ``production/history.json`` — every decision and rollback, oldest first.

Both models are evaluated on the *current* dataset's test split (the champion's own stored
metrics refer to an older split), each with its own recorded input spec.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from cvops_dagster.training.evaluation import classification_metrics, predict
from cvops_dagster.training.model_store import card_input_spec, load_model
from cvops_dagster.imaging.preprocessing import preprocess
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.loading import LoadedDataset, load_dataset

logger = logging.getLogger(__name__)

CURRENT_KEY = "production/current.json"
HISTORY_KEY = "production/history.json"


@dataclass(frozen=True)
class PromotionConfig:
    """Gate settings.

    Attributes:
        margin: how much higher (absolute accuracy) the challenger must score; 0 means
            at least equal.
    """

    margin: float = 0.0


@dataclass
class PromotionDecision:
    """Outcome of the gate."""

    promoted: bool
    reason: str
    challenger_id: str
    champion_id: str | None
    challenger_accuracy: float
    champion_accuracy: float | None
    dataset_version: str
    decided_at: str
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def decide(challenger_accuracy: float, champion_accuracy: float | None, margin: float) -> tuple[bool, str]:
    """The pure rule: promote when there is no champion, or the challenger beats it by ``margin``.

    "Beats" means strictly better when ``margin`` is 0, and at least ``margin`` better
    otherwise, so a retrain that merely ties keeps the proven champion.

    Returns:
        (promote?, human-readable reason).
    """
    if champion_accuracy is None:
        return True, "no current champion"
    gain = challenger_accuracy - champion_accuracy
    tolerance = 1e-12
    wins = gain > tolerance if margin <= 0 else gain >= margin - tolerance
    comparison = f"challenger accuracy {challenger_accuracy:.4f} vs champion {champion_accuracy:.4f} (gain {gain:+.4f}, margin {margin:.4f})"
    if wins:
        return True, f"{comparison}: challenger promoted"
    return False, f"{comparison}: champion kept"


def evaluate_stored_model(
    storage: ArtifactStorage, model_id: str, data: LoadedDataset, split: str = "test"
) -> dict[str, Any]:
    """Evaluate a saved model on ``split`` of ``data`` through its own input spec.

    Raises:
        ValueError: the model's labels differ from the dataset's (not comparable).
    """
    model, card = load_model(storage, model_id)
    if list(card["labels"]) != list(data.labels):
        raise ValueError(f"model {model_id} predicts labels {card['labels']}, dataset {data.version} has {data.labels}")
    part = data.splits[split]
    pred = predict(model, preprocess(part.images, card_input_spec(card)))
    return classification_metrics(part.targets, pred, data.labels)


def current_champion(storage: ArtifactStorage) -> dict[str, Any] | None:
    """The champion record, or ``None`` before the first promotion.

    The history is the source of truth (it is written first); ``current.json`` is the
    convenience copy, used when it agrees with the history.
    """
    record = storage.read_json(CURRENT_KEY) if storage.exists(CURRENT_KEY) else None
    stack = champion_stack(promotion_history(storage))
    if not stack or (record is not None and record.get("model_id") == stack[-1]["model_id"]):
        return record
    logger.warning("current.json disagrees with the promotion history; using the history")
    return stack[-1]


def promotion_history(storage: ArtifactStorage) -> list[dict[str, Any]]:
    """Every promotion decision and rollback, oldest first."""
    return storage.read_json(HISTORY_KEY) if storage.exists(HISTORY_KEY) else []


def _append_history(storage: ArtifactStorage, event: dict[str, Any]) -> None:
    history = promotion_history(storage)
    history.append(event)
    storage.write_json(HISTORY_KEY, history)


def production_summary(storage: ArtifactStorage) -> dict[str, Any]:
    """``model_id``, ``test_accuracy``, ``promoted_at`` and ``dataset_version`` of the champion
    (all ``None`` when there is none)."""
    champion = current_champion(storage) or {}
    return {
        "model_id": champion.get("model_id"),
        "test_accuracy": champion.get("test_accuracy"),
        "promoted_at": champion.get("promoted_at"),
        "dataset_version": champion.get("dataset_version"),
    }


def promote_if_better(
    storage: ArtifactStorage,
    challenger_id: str,
    dataset_version: str,
    config: PromotionConfig | None = None,
    *,
    data: LoadedDataset | None = None,
) -> PromotionDecision:
    """Gate ``challenger_id`` against the champion on ``dataset_version``'s test split.

    The decision (either way) is appended to the history; ``current.json`` changes only on
    promotion. A champion that can no longer be loaded or evaluated (deleted, tampered,
    other labels) is reported in the reason and the challenger replaces it.
    """
    config = config or PromotionConfig()
    data = data or load_dataset(storage, dataset_version)
    challenger = evaluate_stored_model(storage, challenger_id, data)
    champion = current_champion(storage)
    champion_id = champion["model_id"] if champion else None
    champion_metrics: dict[str, Any] | None = None
    note = ""
    if champion_id == challenger_id:
        champion_metrics = challenger
    elif champion_id is not None:
        try:
            champion_metrics = evaluate_stored_model(storage, champion_id, data)
        except (FileNotFoundError, ValueError, RuntimeError) as error:
            note = f"champion {champion_id} could not be evaluated ({error}); "
            logger.warning("%s", note)
    champion_acc = champion_metrics["accuracy"] if champion_metrics else None
    rolled_back = [e for e in promotion_history(storage) if e["event"] == "rollback" and e["champion_id"] == challenger_id]
    if champion_id == challenger_id:
        promoted, reason = False, "challenger is already the champion"
    elif rolled_back:
        # A user rolled this model back: re-running the graph must not quietly promote it again.
        promoted, reason = False, f"challenger was rolled back at {rolled_back[-1]['at']}; retrain to replace the champion"
    else:
        promoted, reason = decide(challenger["accuracy"], champion_acc, config.margin)
    reason = note + reason
    decided_at = _now()
    _append_history(
        storage,
        {
            "event": "promoted" if promoted else "rejected",
            "model_id": challenger_id,
            "champion_id": champion_id,
            "at": decided_at,
            "dataset_version": dataset_version,
            "challenger_metrics": {"accuracy": challenger["accuracy"], "macro_f1": challenger["macro_f1"]},
            "champion_metrics": {"accuracy": champion_metrics["accuracy"], "macro_f1": champion_metrics["macro_f1"]}
            if champion_metrics
            else None,
            "margin": config.margin,
            "reason": reason,
        },
    )
    if promoted:
        record = {
            "model_id": challenger_id,
            "promoted_at": decided_at,
            "dataset_version": dataset_version,
            "test_accuracy": challenger["accuracy"],
            "metrics": {"accuracy": challenger["accuracy"], "macro_f1": challenger["macro_f1"], "n": challenger["n"]},
            "previous_model_id": champion_id,
        }
        storage.write_json(CURRENT_KEY, record)
    logger.info("promotion of %s: %s (%s)", challenger_id, "promoted" if promoted else "kept out", reason)
    return PromotionDecision(
        promoted=promoted,
        reason=reason,
        challenger_id=challenger_id,
        champion_id=champion_id,
        challenger_accuracy=challenger["accuracy"],
        champion_accuracy=champion_acc,
        dataset_version=dataset_version,
        decided_at=decided_at,
        summary=production_summary(storage),
    )


def champion_stack(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replay the history: the stack of champion records, current last."""
    stack: list[dict[str, Any]] = []
    for event in history:
        if event["event"] == "promoted":
            stack.append(
                {
                    "model_id": event["model_id"],
                    "promoted_at": event["at"],
                    "dataset_version": event["dataset_version"],
                    "test_accuracy": event["challenger_metrics"]["accuracy"],
                    "metrics": event["challenger_metrics"],
                }
            )
        elif event["event"] == "rollback" and stack:
            stack.pop()
    return stack


def rollback(storage: ArtifactStorage) -> dict[str, Any]:
    """Restore the previous champion; returns the new :func:`production_summary`.

    Raises:
        ValueError: there is no earlier champion to go back to.
    """
    stack = champion_stack(promotion_history(storage))
    if len(stack) < 2:
        raise ValueError("no previous champion to roll back to")
    dropped, restored = stack[-1], stack[-2]
    at = _now()
    record = {**restored, "restored_at": at, "previous_model_id": dropped["model_id"]}
    _append_history(
        storage,
        {
            "event": "rollback",
            "model_id": restored["model_id"],
            "champion_id": dropped["model_id"],
            "at": at,
            "dataset_version": restored["dataset_version"],
            "reason": f"rolled back from {dropped['model_id']} to {restored['model_id']}",
        },
    )
    storage.write_json(CURRENT_KEY, record)
    logger.info("rolled back production from %s to %s", dropped["model_id"], restored["model_id"])
    return production_summary(storage)
