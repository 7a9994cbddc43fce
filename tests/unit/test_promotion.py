"""Champion gate and publication with real (tiny) models: decisions on today's data and its slices,
publishing only after every check, rollback, reuse of verified runtimes, concurrent publishers."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.cleaning import clean_dataset
from cvops_dagster.datasets.loading import load_dataset
from cvops_dagster.imaging.preprocessing import InputSpec
from cvops_dagster.ingestion.ingest import ingest_batch, read_raw_manifests
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.registry.gate import GateConfig, decide, decide_promotion, decide_rollback, evaluate_stored_model
from cvops_dagster.registry.history import (
    CURRENT_KEY,
    ChampionChangedError,
    current_champion,
    event_keys,
    production_summary,
    read_history,
    replay_history,
)
from cvops_dagster.serving import build as build_mod
from cvops_dagster.serving import export as export_mod
from cvops_dagster.serving.pointer import SERVING_KEY, open_production_predictor, serving_record
from cvops_dagster.serving.publication import publish_decision
from cvops_dagster.serving.quantization import Int8Decision
from cvops_dagster.training.model_store import load_model, save_model
from cvops_dagster.training.models import build_classifier
from cvops_dagster.training.train import TrainConfig, train_model
from tests.unit.synthetic_datasets import copy_storage, shape_images, write_landing_batch


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


# ------------------------------------------------------------------ fixtures: two dataset versions, four models


def _land_and_clean(storage: ArtifactStorage, batches: dict[str, tuple[list, list]]) -> str:
    with tempfile.TemporaryDirectory(prefix="cvops-landing-") as tmp:
        for batch_id, (images, labels) in batches.items():
            write_landing_batch(Path(tmp), batch_id, images, labels)
            ingest_batch(LandingZone(tmp), storage, batch_id)
    result = clean_dataset(storage, read_raw_manifests(storage, batch_ids=list(batches)), workers=1)
    return result.version


def _constant(storage: ArtifactStorage, card: dict, label: int, version: str) -> str:
    """A model that always predicts ``label`` (all weights zero, one head bias)."""
    model = build_classifier(card["architecture"], 2, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias[label] = 1.0
    return save_model(
        storage, model, arch=card["architecture"], labels=card["labels"], input_spec=InputSpec.from_dict(card["input_spec"]),
        dataset_version=version, hyperparameters={}, metrics={}, model_id=f"m-constant-{card['labels'][label]}-{version[:8]}",
    ).model_id  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """V1: mostly hbar. V2: V1 plus a batch of vbar only ("another camera"). A model trained on
    V2, and constant models: always-hbar (scores well on V1's test samples, 0 on the new ones)
    and always-vbar (the reverse)."""
    storage = ArtifactStorage(str(tmp_path_factory.mktemp("promotion")))
    old_images, old_labels = shape_images(2, 60, size=(16, 16), seed=0)
    keep = [i for i, label in enumerate(old_labels) if label == "hbar" or i % 3 == 0]  # 60 hbar, 20 vbar
    first = ([old_images[i] for i in keep], [old_labels[i] for i in keep])
    new_images, new_labels = shape_images(2, 60, size=(16, 16), seed=7)
    second = ([im for im, lb in zip(new_images, new_labels, strict=True) if lb == "vbar"], ["vbar"] * 60)
    v1 = _land_and_clean(storage, {"b1": first})
    v2 = _land_and_clean(storage, {"b1": first, "b2": second})
    good = train_model(storage, v2, {"width": 8, "batch_size": 16, "lr": 0.01}, TrainConfig(max_epochs=10, num_threads=1, baseline=False))
    _, card = load_model(storage, good.model_id)
    return {
        "storage": storage, "v1": v1, "v2": v2, "good": good.model_id,
        "hbar": _constant(storage, card, card["labels"].index("hbar"), v1),
        "vbar": _constant(storage, card, card["labels"].index("vbar"), v2),
    }  # fmt: skip


def _skipped_int8(storage, model_id, **kwargs) -> Int8Decision:  # noqa: ANN001
    return Int8Decision(False, "rejected (not built in this test)", 0.0, 0.0, 0.0, 0.0, None)


@pytest.fixture
def fresh(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ArtifactStorage:
    """The world's models and datasets in a storage of the test's own, with no production state.
    INT8 is not built (tests/unit/test_quantization.py covers it; the lifecycle test runs it)."""
    monkeypatch.setattr(build_mod, "build_int8_runtime", lambda storage, model_id, **kw: _skipped_int8(storage, model_id))
    storage = ArtifactStorage(str(tmp_path / "artifacts"))
    copy_storage(world["storage"], storage)
    return storage


def promote(storage: ArtifactStorage, model_id: str, version: str, **config: float):  # noqa: ANN201
    decision = decide_promotion(storage, model_id, version, GateConfig(**config))
    return decision, publish_decision(storage, decision)


def production_files(storage: ArtifactStorage) -> dict[str, bytes]:
    """Everything production serves from: the pointers, the history and the pinned runtime files."""
    files = {k: storage.read_bytes(k) for k in (CURRENT_KEY, SERVING_KEY, *event_keys(storage))}
    record = json.loads(files[SERVING_KEY])
    files[record["fp32_key"]] = storage.read_bytes(record["fp32_key"])
    return files


# ------------------------------------------------------------------ the gate, the history, rollback


def test_gate_history_and_rollback(world: dict, fresh: ArtifactStorage) -> None:
    storage, v2, good, bad = fresh, world["v2"], world["good"], world["hbar"]
    data = load_dataset(storage, v2)
    assert evaluate_stored_model(storage, good, data)["accuracy"] > evaluate_stored_model(storage, bad, data)["accuracy"]

    assert production_summary(storage)["model_id"] is None
    first, published = promote(storage, bad, v2)
    assert first.promoted and first.champion_id is None and "no current champion" in first.reason
    assert published.kind == "promoted" and published.published and not published.reused
    assert current_champion(storage)["model_id"] == bad and serving_record(storage)["model_id"] == bad

    second, published = promote(storage, good, v2)
    assert second.promoted and second.champion_id == bad and second.check_passed
    summary = production_summary(storage)
    assert summary["model_id"] == good and summary["promoted_at"] and summary["test_accuracy"] == second.metrics["challenger"]["all"]["accuracy"]
    assert open_production_predictor(storage).metadata.model_id == good

    worse, kept = promote(storage, bad, v2)
    assert not worse.promoted and "champion kept" in worse.reason and worse.target_model_id == good
    assert kept.kind == "unchanged" and kept.reused and kept.event is None
    # A margin larger than any possible gain keeps the champion too.
    assert not promote(storage, good, v2, margin=0.5)[0].promoted
    assert [e["event"] for e in read_history(storage)] == ["promoted", "promoted"]

    rollback = decide_rollback(storage)
    assert rollback.kind == "rollback" and rollback.target_model_id == bad and rollback.champion_id == good
    restored = publish_decision(storage, rollback)
    assert restored.kind == "rollback" and restored.reused  # bad's runtime still verifies: no rebuild
    assert current_champion(storage)["model_id"] == bad and current_champion(storage)["previous_model_id"] == good
    assert serving_record(storage)["model_id"] == bad and open_production_predictor(storage).metadata.model_id == bad
    assert [e["event"] for e in read_history(storage)] == ["promoted", "promoted", "rollback"]
    with pytest.raises(ValueError, match="no previous champion"):
        decide_rollback(storage)

    # A crash between the history append and current.json: the history wins.
    stale = json.loads(storage.read_bytes(CURRENT_KEY)) | {"model_id": good}
    storage.write_json(CURRENT_KEY, stale)
    assert current_champion(storage)["model_id"] == bad

    # Re-running the gate with the model just rolled back must not promote it again.
    again, _ = promote(storage, good, v2)
    assert not again.promoted and "rolled back" in again.reason
    assert current_champion(storage)["model_id"] == bad


def test_tampered_champion_is_replaced_with_a_reason(world: dict, fresh: ArtifactStorage) -> None:
    storage, v2 = fresh, world["v2"]
    assert promote(storage, world["good"], v2)[0].promoted
    weights = f"models/{world['good']}/model.safetensors"
    data = bytearray(storage.read_bytes(weights))
    data[-3] ^= 0x10
    storage.write_bytes(weights, bytes(data))
    decision, published = promote(storage, world["hbar"], v2)
    assert decision.promoted and "could not be evaluated" in decision.reason and published.published


def test_an_unchanged_gate_reuses_its_decision(world: dict, fresh: ArtifactStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = fresh
    decision, _ = promote(storage, world["good"], world["v2"])
    same = decide_promotion(storage, world["good"], world["v2"])  # production changed: a new decision
    assert same.decision_id != decision.decision_id and same.kind == "keep"
    monkeypatch.setattr("cvops_dagster.registry.gate.load_dataset", lambda *a: pytest.fail("re-evaluated unchanged inputs"))
    assert decide_promotion(storage, world["good"], world["v2"]) == same


# ------------------------------------------------------------------ harder new data: like with like


def test_harder_new_data_promotes_a_real_improvement_and_stops_a_regression(world: dict, fresh: ArtifactStorage) -> None:
    storage, v1, v2 = fresh, world["v1"], world["v2"]
    # The champion was chosen on V1, where always-hbar is mostly right.
    first, _ = promote(storage, world["hbar"], v1)
    assert first.promoted
    served = production_files(storage)

    # V2 adds a batch of vbar only. Always-vbar wins on the whole new test split by being right
    # on the new data, while it regresses on the champion's own (previous) test samples.
    regress = decide_promotion(storage, world["vbar"], v2)
    challenger, champion = regress.metrics["challenger"], regress.metrics["champion"]
    assert challenger["previous"]["n"] > 0 and challenger["new"]["n"] > 0
    assert challenger["previous"]["n"] + challenger["new"]["n"] == challenger["all"]["n"]
    assert challenger["all"]["accuracy"] > champion["all"]["accuracy"] and regress.promoted
    assert challenger["previous"]["accuracy"] < champion["previous"]["accuracy"] - 0.01
    assert not regress.check_passed and "REGRESSION" in regress.no_regression["reason"]
    with pytest.raises(ValueError, match="failed check_production_model_no_regression"):
        publish_decision(storage, regress)
    assert production_files(storage) == served  # nothing published, serving unchanged

    # A model that is better overall and no worse on the previous samples goes through.
    better, published = promote(storage, world["good"], v2)
    assert better.promoted and better.check_passed
    assert better.metrics["challenger"]["previous"]["accuracy"] >= better.metrics["champion"]["previous"]["accuracy"]
    assert published.kind == "promoted" and serving_record(storage)["model_id"] == world["good"]


# ------------------------------------------------------------------ failures leave production as it was


def test_failed_parity_publishes_nothing_and_leaves_the_served_file_alone(
    world: dict, fresh: ArtifactStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = fresh
    promote(storage, world["hbar"], world["v2"])
    served = production_files(storage)
    real = export_mod.check_parity
    monkeypatch.setattr(export_mod, "check_parity", lambda *a, **k: real(*a, **k).__class__(1.0, 0.5, 1, False))
    decision = decide_promotion(storage, world["good"], world["v2"])
    outcome = publish_decision(storage, decision)
    assert not outcome.published and outcome.kind == "refused" and outcome.event is None
    assert production_files(storage) == served
    assert current_champion(storage)["model_id"] == world["hbar"] and serving_record(storage)["model_id"] == world["hbar"]
    # The refused candidate stays where it was built, under its own content address, unserved.
    assert storage.exists(outcome.runtime["fp32_key"]) and outcome.runtime["fp32_key"] not in served


def test_a_concurrent_publish_between_decision_and_publish_is_refused(world: dict, fresh: ArtifactStorage) -> None:
    storage = fresh
    promote(storage, world["hbar"], world["v2"])
    decision = decide_promotion(storage, world["good"], world["v2"])
    assert decision.promoted and decision.champion_id == world["hbar"]
    promote(storage, world["vbar"], world["v2"], regression_tolerance=1.0)  # someone else publishes meanwhile
    served = production_files(storage)
    with pytest.raises(ChampionChangedError, match=f"made against champion {world['hbar']}.*{world['vbar']} is in service"):
        publish_decision(storage, decision)
    assert production_files(storage) == served


def test_the_publisher_that_loses_a_race_fails_and_the_pointers_follow_the_winner(world: dict, fresh: ArtifactStorage) -> None:
    storage = fresh
    promote(storage, world["hbar"], world["v2"])
    ours = decide_promotion(storage, world["good"], world["v2"])
    theirs = decide_promotion(storage, world["vbar"], world["v2"], GateConfig(regression_tolerance=1.0))

    def build_while_another_publishes(storage: ArtifactStorage, model_id: str, version: str | None):  # noqa: ANN202
        built = build_mod.build_runtimes(storage, model_id, version)
        publish_decision(storage, theirs)  # lands after our precondition check, before our event
        return built

    with pytest.raises(ChampionChangedError, match="concurrent publisher came first"):
        publish_decision(storage, ours, build=build_while_another_publishes)
    history = replay_history(storage)
    assert history.champion.model_id == world["vbar"] and len(history.void) == 1
    assert serving_record(storage)["model_id"] == world["vbar"] == current_champion(storage)["model_id"]


# ------------------------------------------------------------------ reuse, rebuild, --no-export


def test_a_verified_runtime_is_reused_and_a_tampered_one_rebuilt_with_a_warning(
    world: dict, fresh: ArtifactStorage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = fresh
    decision, first = promote(storage, world["good"], world["v2"])
    calls = []
    counting = lambda *a, **k: calls.append(a) or build_mod.build_runtimes(*a, **k)  # noqa: E731
    again = publish_decision(storage, decision, build=counting)
    assert again.kind == "unchanged" and again.reused and calls == []  # a second run costs no export
    assert again.checks["parity"]["passed"]  # the figures recorded when it was published

    key = first.runtime["fp32_key"]
    data = bytearray(storage.read_bytes(key))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(key, bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = publish_decision(storage, decision, build=counting)
    assert len(calls) == 1 and not rebuilt.reused and "no longer verifies" in rebuilt.note
    assert "rebuilding the runtime of" in caplog.text and "no longer verifies" in caplog.text
    assert open_production_predictor(storage).metadata.model_id == world["good"]
    # The export is deterministic: the rebuilt file is the published one, byte for byte, under
    # the same content address, so the history needs no new event (a changed build would be
    # "republished"); the damaged copy was replaced, and the log says so.
    assert rebuilt.runtime == first.runtime and rebuilt.kind == "unchanged"
    assert "does not hold the bytes its content address names" in caplog.text
    assert [e["event"] for e in read_history(storage)] == ["promoted"]


def test_rollback_without_export_needs_a_runtime_that_verifies(world: dict, fresh: ArtifactStorage) -> None:
    storage = fresh
    _, first = promote(storage, world["hbar"], world["v2"])
    promote(storage, world["good"], world["v2"])
    storage.delete(first.runtime["fp32_key"])
    served = production_files(storage)
    rollback = decide_rollback(storage)
    with pytest.raises(FileNotFoundError, match=f"no runtime to reuse for model {world['hbar']}.*missing.*without --no-export"):
        publish_decision(storage, rollback, reuse_only=True)
    assert production_files(storage) == served
    # A rollback decided in an earlier run is not completed by a later one that did not ask for it.
    with pytest.raises(ValueError, match="never published.*cvops rollback"):
        publish_decision(storage, rollback, rollback_requested=False)
    restored = publish_decision(storage, rollback)  # without --no-export: rebuilt
    assert restored.kind == "rollback" and not restored.reused
    assert serving_record(storage)["model_id"] == world["hbar"] and storage.exists(first.runtime["fp32_key"])


def test_state_of_the_previous_layout_is_carried_over(world: dict, fresh: ArtifactStorage) -> None:
    """history.json + serving.json as the previous layout wrote them: the champion keeps serving its
    runtime, which the first publish records in the history (no rebuild)."""
    storage = fresh
    built = build_mod.build_runtimes(storage, world["good"], world["v2"])
    from cvops_dagster.serving.pointer import publish

    publish(storage, built.pointer())
    legacy = [{"event": "promoted", "model_id": world["good"], "champion_id": None, "at": "2026-01-01T00:00:00+00:00",
               "dataset_version": world["v2"], "challenger_metrics": {"accuracy": 0.9, "macro_f1": 0.9}, "reason": "old"}]  # fmt: skip
    storage.write_json("production/history.json", legacy)
    assert serving_record(storage)["model_id"] == world["good"]
    decision, outcome = promote(storage, world["good"], world["v2"])
    assert decision.kind == "keep" and outcome.kind == "republished" and outcome.reused
    assert outcome.runtime == built.pointer().to_dict()
    events = read_history(storage)
    assert [e["event"] for e in events] == ["promoted", "republished"] and events[-1]["runtime"] == outcome.runtime
    assert "published before history events carried their runtime" in events[-1]["reason"]
    rollback_refused = pytest.raises(ValueError, match="no previous champion")
    with rollback_refused:
        decide_rollback(storage)
