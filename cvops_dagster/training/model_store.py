"""Saved models: safetensors weights plus a JSON model card, verified on load.

Layout: ``models/<model_id>/model.safetensors`` and ``models/<model_id>/model_card.json``.
The card records the weights' SHA-256; :func:`load_model` refuses weights that differ.
The card is written last, so a model exists only once both files are complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from cvops_dagster.training.models import build_classifier, full_arch
from cvops_dagster.imaging.preprocessing import InputSpec
from cvops_dagster.core.storage import ArtifactStorage, sha256_bytes

logger = logging.getLogger(__name__)

CARD_VERSION = 1


class ModelIntegrityError(RuntimeError):
    """Stored weights do not match the hash recorded in the model card."""


def model_keys(model_id: str) -> tuple[str, str]:
    """(weights key, card key) of a model."""
    return f"models/{model_id}/model.safetensors", f"models/{model_id}/model_card.json"


def code_version() -> str:
    """Version of this package, as recorded in model cards."""
    try:
        return metadata.version("cvops-dagster")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class SavedModel:
    """Where a model was written and its card."""

    model_id: str
    weights_key: str
    card_key: str
    weights_sha256: str
    card: dict[str, Any]


def save_model(
    storage: ArtifactStorage,
    model: nn.Module,
    *,
    arch: dict[str, Any],
    labels: list[str],
    input_spec: InputSpec,
    dataset_version: str,
    hyperparameters: dict[str, Any],
    metrics: dict[str, Any],
    model_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> SavedModel:
    """Write ``model``'s weights as safetensors and its card as JSON.

    Args:
        model: a network built by :func:`cvops_dagster.training.models.build_classifier`.
        arch: the architecture dict it was built from.
        labels: class names in output order.
        input_spec: the preprocessing the model expects.
        dataset_version: dataset it was trained on.
        hyperparameters: training hyperparameters.
        metrics: evaluation figures (plain JSON numbers).
        model_id: defaults to ``m-<first 16 hex of the weights' sha256>`` (content addressed).
        extra: further JSON fields for the card.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"format": "pt"})
    digest = sha256_bytes(data)
    model_id = model_id or f"m-{digest[:16]}"
    weights_key, card_key = model_keys(model_id)
    card = {
        "card_version": CARD_VERSION,
        "model_id": model_id,
        "architecture": full_arch(arch),
        "num_classes": len(labels),
        "labels": list(labels),
        "input_spec": input_spec.to_dict(),
        "dataset_version": dataset_version,
        "hyperparameters": hyperparameters,
        "metrics": metrics,
        "code_version": code_version(),
        "weights_key": weights_key,
        "weights_sha256": digest,
        "created_at": datetime.now(UTC).isoformat(),
        **(extra or {}),
    }
    storage.write_bytes(weights_key, data)
    storage.write_json(card_key, card)
    logger.info("saved model %s (%d bytes) at %s", model_id, len(data), storage.uri(weights_key))
    return SavedModel(model_id, weights_key, card_key, digest, card)


def load_card(storage: ArtifactStorage, model_id: str) -> dict[str, Any]:
    """The model card of ``model_id``."""
    _, card_key = model_keys(model_id)
    if not storage.exists(card_key):
        raise FileNotFoundError(f"model {model_id!r} not found ({storage.uri(card_key)} missing)")
    return storage.read_json(card_key)


def load_model(storage: ArtifactStorage, model_id: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved model in eval mode, after checking its weights against the card's hash.

    Returns:
        ``(model, card)``.

    Raises:
        FileNotFoundError: the model does not exist.
        ModelIntegrityError: the weights' sha256 differs from the card's.
    """
    card = load_card(storage, model_id)
    weights_key, _ = model_keys(model_id)
    data = storage.read_bytes(weights_key)
    actual = sha256_bytes(data)
    if actual != card["weights_sha256"]:
        raise ModelIntegrityError(
            f"refusing model {model_id}: weights sha256 {actual} differs from {card['weights_sha256']} in its model card"
        )
    model = build_classifier(card["architecture"], card["num_classes"], int(card["input_spec"]["channels"]))
    model.load_state_dict(load_safetensors(data), strict=True)
    model.eval()
    return model, card


def card_input_spec(card: dict[str, Any]) -> InputSpec:
    """The :class:`InputSpec` recorded in a model card."""
    return InputSpec.from_dict(card["input_spec"])
