"""Champion gate: decisions, history, rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvops_dagster.training.model_store import load_model, save_model
from cvops_dagster.training.models import build_classifier
from cvops_dagster.imaging.preprocessing import InputSpec
from cvops_dagster.registry.promotion import (
    PromotionConfig,
    current_champion,
    decide,
    evaluate_stored_model,
    production_summary,
    promote_if_better,
    promotion_history,
    rollback,
)
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.training.train import TrainConfig, train_model
from cvops_dagster.datasets.loading import load_dataset
from tests.unit.synthetic_datasets import only_version, shapes_dataset


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "expected"),
    [
        (0.5, None, 0.0, True),
        (0.91, 0.90, 0.0, True),
        (0.90, 0.90, 0.0, False),  # a tie keeps the proven champion
        (0.89, 0.90, 0.0, False),
        (0.92, 0.90, 0.02, True),
        (0.915, 0.90, 0.02, False),
        (1.0, 0.99, 0.005, True),
    ],
)
def test_decide(challenger: float, champion: float | None, margin: float, expected: bool) -> None:
    promoted, reason = decide(challenger, champion, margin)
    assert promoted is expected
    assert reason


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArtifactStorage, str, str]:
    """A dataset, a trained model and a constant (always class 0) model on it."""
    storage = ArtifactStorage(str(tmp_path_factory.mktemp("promotion")))
    version = shapes_dataset(storage, n_classes=2, per_class=40, size=(16, 16)).version
    good = train_model(storage, version, {"width": 8, "batch_size": 16, "lr": 0.01}, TrainConfig(max_epochs=10, num_threads=1, baseline=False))
    model, card = load_model(storage, good.model_id)
    constant = build_classifier(card["architecture"], 2, 1)
    with torch.no_grad():
        for p in constant.parameters():
            p.zero_()
        constant.head.bias.copy_(torch.tensor([1.0, 0.0]))
    bad = save_model(
        storage,
        constant,
        arch=card["architecture"],
        labels=card["labels"],
        input_spec=InputSpec.from_dict(card["input_spec"]),
        dataset_version=version,
        hyperparameters={},
        metrics={},
    )
    return storage, good.model_id, bad.model_id


def test_gate_history_and_rollback(models: tuple[ArtifactStorage, str, str], tmp_path: Path) -> None:
    source, good, bad = models
    version = only_version(source)
    # Fresh production state per test, same models and dataset.
    storage = ArtifactStorage(str(tmp_path))
    for key in source.list(""):
        if not key.startswith("production/"):
            storage.write_bytes(key, source.read_bytes(key))
    data = load_dataset(storage, version)
    good_acc = evaluate_stored_model(storage, good, data)["accuracy"]
    bad_acc = evaluate_stored_model(storage, bad, data)["accuracy"]
    assert good_acc > bad_acc

    assert production_summary(storage)["model_id"] is None
    first = promote_if_better(storage, bad, version, data=data)
    assert first.promoted and first.champion_id is None and "no current champion" in first.reason
    assert current_champion(storage)["model_id"] == bad

    second = promote_if_better(storage, good, version, data=data)
    assert second.promoted and second.champion_id == bad
    assert second.champion_accuracy == pytest.approx(bad_acc)
    summary = production_summary(storage)
    assert summary["model_id"] == good and summary["test_accuracy"] == pytest.approx(good_acc) and summary["promoted_at"]

    worse = promote_if_better(storage, bad, version, data=data)
    assert not worse.promoted and "champion kept" in worse.reason
    assert current_champion(storage)["model_id"] == good

    # A margin larger than any possible gain keeps the champion too.
    assert not promote_if_better(storage, good, version, PromotionConfig(margin=0.5), data=data).promoted

    restored = rollback(storage)
    assert restored["model_id"] == bad
    assert current_champion(storage)["previous_model_id"] == good
    events = [e["event"] for e in promotion_history(storage)]
    assert events == ["promoted", "promoted", "rejected", "rejected", "rollback"]
    with pytest.raises(ValueError, match="no previous champion"):
        rollback(storage)

    # A crash between the history append and current.json: the history wins.
    stale = current_champion(storage) | {"model_id": good}
    storage.write_json("production/current.json", stale)
    assert current_champion(storage)["model_id"] == bad
    storage.write_json("production/current.json", stale | {"model_id": bad})

    # Re-running the gate with the model just rolled back must not promote it again.
    again = promote_if_better(storage, good, version, data=data)
    assert not again.promoted and "rolled back" in again.reason
    assert current_champion(storage)["model_id"] == bad


def test_tampered_champion_is_replaced_with_a_reason(models: tuple[ArtifactStorage, str, str], tmp_path: Path) -> None:
    source, good, bad = models
    version = only_version(source)
    storage = ArtifactStorage(str(tmp_path))
    for key in source.list(""):
        if not key.startswith("production/"):
            storage.write_bytes(key, source.read_bytes(key))
    assert promote_if_better(storage, good, version).promoted
    weights = f"models/{good}/model.safetensors"
    data = bytearray(storage.read_bytes(weights))
    data[-3] ^= 0x10
    storage.write_bytes(weights, bytes(data))
    decision = promote_if_better(storage, bad, version)
    assert decision.promoted and "could not be evaluated" in decision.reason
