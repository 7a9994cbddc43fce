"""The champion gate: decide, on today's data, which model should serve; publish nothing.

:func:`decide_promotion` scores the challenger and the champion *now*, on the same samples: the
current dataset's test split (``all``) and slices of it, ``previous`` (test samples that were
clean rows of the champion's own dataset version, i.e. the data the champion was chosen on;
splits are hash-stable, so those stay in test), ``new`` (the rest) and ``production`` (labelled
production images in the test split: after drift, the drifted stream's held-out labelled images).
Promotion is judged on ``all``, which holds the production test split, so it reflects the
drifted stream, while the no-regression check on ``previous`` guards in-distribution accuracy. The rule is
:func:`decide`: the challenger must beat the champion on ``all`` by the margin; a model that was
rolled back is never promoted again. The blocking no-regression check compares like with like:
on ``previous``, the model that would serve after the gate must score at least the current
champion minus the tolerance. A challenger that wins overall by improving on new data while
getting worse on the old data fails it, and then nothing is published.

:func:`decide_rollback` decides to restore the previous champion (a request, not gated on accuracy).

Both record a :class:`~cvops_dagster.registry.decisions.Decision`; publishing it is
:mod:`cvops_dagster.serving.publication`'s job, in ``onnx_runtime``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cvops_dagster.core.contracts import dataset_keys
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.loading import LoadedDataset, load_dataset
from cvops_dagster.imaging.preprocessing import preprocess
from cvops_dagster.registry.decisions import Decision, decision_id, decision_key, read_decision, write_decision
from cvops_dagster.registry.history import Champion, Replay, replay_history
from cvops_dagster.training.evaluation import classification_metrics, predict
from cvops_dagster.training.model_store import card_input_spec, load_card, load_model

logger = logging.getLogger(__name__)

SLICES = ("all", "previous", "new", "production")
#: Records that came from labelled production images (review feedback) carry this batch prefix.
PRODUCTION_BATCH_PREFIX = "production/"


@dataclass(frozen=True)
class GateConfig:
    """Gate settings.

    Attributes:
        margin: how much higher (absolute accuracy, whole test split) the challenger must score;
            0 means strictly higher.
        regression_tolerance: how far the model serving after the gate may score below the
            current champion on the ``previous`` slice (both measured now).
    """

    margin: float = 0.0
    regression_tolerance: float = 0.01


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


# --------------------------------------------------------------------------- scoring


def evaluate_stored_model(
    storage: ArtifactStorage, model_id: str, data: LoadedDataset, split: str = "test"
) -> dict[str, Any]:
    """Evaluate a saved model on ``split`` of ``data`` through its own input spec (full metrics).

    Raises:
        ValueError: the model's labels differ from the dataset's (not comparable).
    """
    pred, _ = _predictions(storage, model_id, data, split)
    return classification_metrics(data.splits[split].targets, pred, data.labels)


def _predictions(storage: ArtifactStorage, model_id: str, data: LoadedDataset, split: str = "test") -> tuple[np.ndarray, dict[str, Any]]:
    model, card = load_model(storage, model_id)
    if list(card["labels"]) != list(data.labels):
        raise ValueError(f"model {model_id} predicts labels {card['labels']}, dataset {data.version} has {data.labels}")
    return predict(model, preprocess(data.splits[split].images, card_input_spec(card))), card


def split_slices(storage: ArtifactStorage, data: LoadedDataset, previous_version: str | None) -> tuple[dict[str, np.ndarray], str]:
    """Boolean masks over ``data``'s test split: ``all``, ``previous`` and ``new``, and a note.

    ``previous`` holds the test samples whose ``sample_id`` is a clean row of ``previous_version``
    (the champion's own dataset). When that version cannot be read, ``previous`` is the whole
    split and the note says so.
    """
    ids = np.asarray(data.splits["test"].sample_ids, dtype=object)
    everything = np.ones(len(ids), dtype=bool)
    production = _production_mask(storage, data.version, ids)
    if previous_version is None:
        return {"all": everything, "previous": np.zeros(len(ids), dtype=bool), "new": everything.copy(), "production": production}, ""
    manifest_key, _ = dataset_keys(previous_version)
    if not storage.exists(manifest_key):
        note = f"the champion's dataset {previous_version} is gone; 'previous' is the whole test split. "
        return {"all": everything, "previous": everything.copy(), "new": ~everything, "production": production}, note
    frame = storage.read_parquet(manifest_key)
    known = set(frame.loc[frame["outcome"] == "clean", "sample_id"].astype(str))
    previous = np.fromiter((str(s) in known for s in ids), dtype=bool, count=len(ids))
    return {"all": everything, "previous": previous, "new": ~previous, "production": production}, ""


def _production_mask(storage: ArtifactStorage, version: str, ids: np.ndarray) -> np.ndarray:
    """Test samples of ``version`` that are labelled production images (the drifted stream's
    labelled test split, when there is one)."""
    manifest_key, _ = dataset_keys(version)
    if not storage.exists(manifest_key):
        return np.zeros(len(ids), dtype=bool)
    frame = storage.read_parquet(manifest_key)
    clean = frame[frame["outcome"] == "clean"]
    produced = set(clean.loc[clean["batch_id"].astype(str).str.startswith(PRODUCTION_BATCH_PREFIX), "sample_id"].astype(str))
    return np.fromiter((str(s) in produced for s in ids), dtype=bool, count=len(ids))


def slice_metrics(targets: np.ndarray, pred: np.ndarray, masks: dict[str, np.ndarray], labels: list[str]) -> dict[str, dict[str, Any]]:
    """``{slice: {accuracy, macro_f1, n}}``; an empty slice has ``None`` figures and ``n`` 0."""
    out: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        if not mask.any():
            out[name] = {"accuracy": None, "macro_f1": None, "n": 0}
            continue
        metrics = classification_metrics(targets[mask], pred[mask], labels)
        out[name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n": metrics["n"]}
    return out


# --------------------------------------------------------------------------- deciding


def _champion_version(storage: ArtifactStorage, champion: Champion) -> str | None:
    """The dataset version the champion was trained on (its card), else the one it was promoted on."""
    try:
        return str(load_card(storage, champion.model_id)["dataset_version"])
    except (FileNotFoundError, KeyError, ValueError):
        return champion.dataset_version


def no_regression(target_is_champion: bool, challenger: dict[str, Any], champion: dict[str, Any] | None, tolerance: float, note: str = "") -> dict[str, Any]:
    """The no-regression verdict: the model serving after the gate against the current champion,
    both scored now, on ``previous`` (on ``all`` when ``previous`` is empty).

    Args:
        target_is_champion: the gate keeps the champion (nothing changes in production).
        challenger: the challenger's slice metrics.
        champion: the champion's slice metrics (``None``: no champion, or not evaluable).
        tolerance: allowed accuracy drop.
        note: why the champion could not be evaluated, when it could not.
    """
    base = {"slice": "previous", "tolerance": tolerance, "target_accuracy": None, "champion_accuracy": None}
    if champion is None:
        return {**base, "passed": True, "reason": note or "no champion to compare with"}
    if target_is_champion:
        acc = champion["previous"]["accuracy"]
        return {**base, "passed": True, "target_accuracy": acc, "champion_accuracy": acc, "reason": "the champion stays in service"}
    name = "previous" if champion["previous"]["n"] else "all"
    target, before = challenger[name]["accuracy"], champion[name]["accuracy"]
    passed = target >= before - tolerance - 1e-12
    reason = (
        f"on the {name} slice ({challenger[name]['n']} samples) the challenger scores {target:.4f} against the "
        f"champion's {before:.4f} (tolerance {tolerance:.4f}): {'no regression' if passed else 'REGRESSION'}"
    )
    if name == "all":
        reason += "; the current test split holds none of the champion's own test samples"
    return {**base, "slice": name, "passed": passed, "target_accuracy": target, "champion_accuracy": before, "reason": reason}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _recorded(storage: ArtifactStorage, did: str) -> Decision | None:
    if storage.exists(decision_key(did)):
        logger.info("decision %s was already made on these inputs; reusing it", did)
        return read_decision(storage, did)
    return None


def _score_champion(storage: ArtifactStorage, champion: Champion, data: LoadedDataset, masks: dict[str, np.ndarray]) -> tuple[dict[str, Any] | None, str | None, str]:
    """(slice metrics, weights hash, note) of the champion; metrics ``None`` when it cannot be evaluated."""
    try:
        pred, card = _predictions(storage, champion.model_id, data)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        note = f"champion {champion.model_id} could not be evaluated ({error}); "
        logger.warning("%s", note)
        return None, None, note
    return slice_metrics(data.splits["test"].targets, pred, masks, data.labels), card["weights_sha256"], ""


def decide_promotion(
    storage: ArtifactStorage,
    challenger_id: str,
    dataset_version: str,
    config: GateConfig | None = None,
    *,
    data: LoadedDataset | None = None,
) -> Decision:
    """Weigh ``challenger_id`` against the champion on ``dataset_version``'s test split and record
    the decision (see the module docstring). Production is not changed.

    A champion that can no longer be loaded or evaluated (deleted, tampered, other labels) is
    reported in the reason and the challenger replaces it.
    """
    config = config or GateConfig()
    history: Replay = replay_history(storage)
    champion = history.champion
    champion_id = champion.model_id if champion else None
    did = decision_id(
        kind="gate", challenger=challenger_id, champion=champion_id, last_event=history.last_event_id,
        dataset_version=dataset_version, margin=config.margin, tolerance=config.regression_tolerance,
    )  # fmt: skip
    if (recorded := _recorded(storage, did)) is not None:
        return recorded
    data = data or load_dataset(storage, dataset_version)
    masks, note = split_slices(storage, data, _champion_version(storage, champion) if champion else None)
    pred, card = _predictions(storage, challenger_id, data)
    targets = data.splits["test"].targets
    challenger = slice_metrics(targets, pred, masks, data.labels)
    champion_metrics, champion_hash = None, None
    if champion_id == challenger_id:
        champion_metrics, champion_hash = challenger, card["weights_sha256"]
    elif champion is not None:
        champion_metrics, champion_hash, failed = _score_champion(storage, champion, data, masks)
        note += failed
    if champion_id == challenger_id:
        promote, reason = False, "challenger is already the champion"
    elif challenger_id in history.rolled_back:
        # A user rolled this model back: re-running the graph must not quietly promote it again.
        promote, reason = False, f"challenger was rolled back at {history.rolled_back[challenger_id]}; retrain to replace the champion"
    else:
        champion_acc = champion_metrics["all"]["accuracy"] if champion_metrics else None
        promote, reason = decide(challenger["all"]["accuracy"], champion_acc, config.margin)
    target = challenger_id if promote else champion_id
    assert target is not None  # no champion means the challenger is promoted
    decision = Decision(
        decision_id=did,
        kind="promote" if promote else "keep",
        target_model_id=target,
        challenger_id=challenger_id,
        champion_id=champion_id,
        last_event_id=history.last_event_id,
        dataset_version=dataset_version,
        reason=note + reason,
        metrics={"challenger": challenger, "champion": champion_metrics},
        no_regression=no_regression(not promote, challenger, champion_metrics, config.regression_tolerance, note),
        decided_at=_now(),
        target_model_hash=card["weights_sha256"] if promote else (champion_hash or (champion.model_hash if champion else None)),
        target_dataset_version=dataset_version,
        target_metrics=challenger["all"] if promote else dict(champion.metrics if champion else {}),
        margin=config.margin,
    )
    write_decision(storage, decision)
    logger.info("gate %s: %s -> %s (%s)", did, challenger_id, decision.kind, decision.reason)
    return decision


def decide_rollback(storage: ArtifactStorage) -> Decision:
    """Decide to restore the previous champion, and record it.

    Raises:
        ValueError: production has fewer than two champions (nothing to go back to).
    """
    history = replay_history(storage)
    if len(history.stack) < 2:
        served = history.champion.model_id if history.champion else "none"
        raise ValueError(f"no previous champion to roll back to (the production history holds one champion at most; in service: {served})")
    dropped, restored = history.stack[-1], history.stack[-2]
    did = decision_id(kind="rollback", champion=dropped.model_id, target=restored.model_id, last_event=history.last_event_id)
    if (recorded := _recorded(storage, did)) is not None:
        return recorded
    decision = Decision(
        decision_id=did,
        kind="rollback",
        target_model_id=restored.model_id,
        challenger_id=None,
        champion_id=dropped.model_id,
        last_event_id=history.last_event_id,
        dataset_version=None,
        reason=f"rollback requested: restore {restored.model_id} (promoted {restored.promoted_at}) in place of {dropped.model_id}",
        metrics={"restored": restored.metrics, "rolled_back": dropped.metrics},
        no_regression={
            "passed": True, "slice": None, "tolerance": None, "target_accuracy": None, "champion_accuracy": None,
            "reason": "a rollback restores a model that served before, on request; it is not gated on accuracy",
        },  # fmt: skip
        decided_at=_now(),
        target_model_hash=restored.model_hash,
        target_dataset_version=(restored.runtime or {}).get("dataset_version") or restored.dataset_version,
        target_metrics=restored.metrics,
    )
    write_decision(storage, decision)
    logger.info("rollback decision %s: %s -> %s", did, dropped.model_id, restored.model_id)
    return decision
