"""The production history and its readers: append-only events, the replay, concurrent appenders,
named errors for damaged files, and serving.json cross-checked against the history."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from cvops_dagster import cli
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.registry.decisions import Decision, read_decision, write_decision
from cvops_dagster.registry.history import (
    CURRENT_KEY,
    LEGACY_HISTORY_KEY,
    ProductionStateError,
    append_event,
    current_champion,
    event_keys,
    read_history,
    replay,
    replay_history,
    write_current,
)
from cvops_dagster.serving.pointer import SERVING_KEY, open_production_predictor, serving_record
from cvops_dagster.serving.runtime_file import RuntimeModelError


def runtime(model_id: str, digest: str = "a") -> dict:
    return {
        "model_id": model_id, "dataset_version": "ds", "fp32_key": f"runtimes/{model_id}/{digest * 64}.onnx",
        "fp32_sha256": digest * 64, "int8_key": None, "int8_sha256": None,
    }  # fmt: skip


def promote(storage: ArtifactStorage, model_id: str, replaces: str | None, digest: str = "a") -> dict:
    return append_event(storage, "promoted", model_id, replaces=replaces, runtime=runtime(model_id, digest), metrics={"accuracy": 0.5})


def publish_pointers(storage: ArtifactStorage) -> None:
    """What the publisher does after an event (without the file checks: these runtimes are fake)."""
    champion = replay_history(storage).champion
    write_current(storage, champion)
    storage.write_json(SERVING_KEY, champion.runtime)


# ------------------------------------------------------------------ events and the replay


def test_events_are_immutable_objects_and_the_replay_follows_them(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    a = promote(storage, "m-a", None)
    b = promote(storage, "m-b", "m-a")
    again = append_event(storage, "republished", "m-b", replaces="m-b", runtime=runtime("m-b", "c"))
    back = append_event(storage, "rollback", "m-a", replaces="m-b", runtime=runtime("m-a"))
    keys = event_keys(storage)
    assert len(keys) == 4 and all(k.startswith("production/history/") and k.endswith(".json") for k in keys)
    assert [storage.read_json(k)["event_id"] for k in keys] == [e["event_id"] for e in (a, b, again, back)]
    result = replay_history(storage)
    assert [c.model_id for c in result.stack] == ["m-a"] and not result.void
    champion = result.champion
    assert champion.previous_model_id == "m-b" and champion.restored_at == back["at"]
    assert champion.runtime == runtime("m-a") and champion.event_id == back["event_id"]
    assert result.rolled_back == {"m-b": back["at"]}
    assert result.published_event("m-b")["event_id"] == again["event_id"]  # the rebuilt runtime


def test_an_event_that_lost_a_race_is_void(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    promote(storage, "m-a", None)
    promote(storage, "m-b", "m-a")
    late = promote(storage, "m-c", "m-a")  # decided against m-a, but m-b got there first
    bad_rollback = append_event(storage, "rollback", "m-x", replaces="m-b", runtime=runtime("m-x"))
    result = replay_history(storage)
    assert [c.model_id for c in result.stack] == ["m-a", "m-b"]
    assert "expected m-a in service, found m-b" in result.void[late["event_id"]]
    assert "restores m-x, but the champion before m-b is m-a" in result.void[bad_rollback["event_id"]]


def test_the_legacy_history_is_read_as_the_oldest_events(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    legacy = [
        {"event": "promoted", "model_id": "m-a", "champion_id": None, "at": "2026-01-01T00:00:00+00:00", "dataset_version": "v1",
         "challenger_metrics": {"accuracy": 0.9, "macro_f1": 0.9}},
        {"event": "rejected", "model_id": "m-x", "champion_id": "m-a", "at": "2026-01-02T00:00:00+00:00"},
        {"event": "promoted", "model_id": "m-b", "champion_id": "m-a", "at": "2026-01-03T00:00:00+00:00", "dataset_version": "v2",
         "challenger_metrics": {"accuracy": 0.95, "macro_f1": 0.95}},
    ]  # fmt: skip
    storage.write_json(LEGACY_HISTORY_KEY, legacy)
    assert [e["event_id"] for e in read_history(storage)] == ["legacy-000000", "legacy-000002"]
    champion = replay_history(storage).champion
    assert champion.model_id == "m-b" and champion.runtime is None and champion.metrics["accuracy"] == 0.95
    back = append_event(storage, "rollback", "m-a", replaces="m-b", runtime=runtime("m-a"))
    assert replay_history(storage).champion.model_id == "m-a"
    assert [e["event_id"] for e in read_history(storage)][-1] == back["event_id"]


@pytest.fixture
def s3_storage(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """An artifact store on a real S3 endpoint (moto's server on 127.0.0.1)."""
    from tests.s3server import s3_server

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with s3_server(("cvops",)) as endpoint:
        yield ArtifactStorage("s3://cvops/artifacts", endpoint_url=endpoint)


@pytest.mark.parametrize("root", ["folder", "memory", "s3"])
def test_threads_appending_at_once_lose_nothing(tmp_path: Path, root: str, request: pytest.FixtureRequest) -> None:
    import uuid

    if root == "s3":
        storage = request.getfixturevalue("s3_storage")
    else:
        storage = ArtifactStorage(str(tmp_path) if root == "folder" else f"memory://cvops-{uuid.uuid4().hex}")
    threads, per_thread = 8, 12
    barrier = threading.Barrier(threads)

    def worker(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            # Every writer races for the first promotion: each appends, exactly one wins the replay.
            append_event(storage, "promoted", f"m-{i}-{j}", replaces=None, runtime=runtime(f"m-{i}-{j}"))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    events = read_history(storage)
    assert len(events) == threads * per_thread
    assert {e["model_id"] for e in events} == {f"m-{i}-{j}" for i in range(threads) for j in range(per_thread)}
    result = replay(events)
    assert len(result.stack) == 1 and len(result.void) == threads * per_thread - 1
    assert result.champion.model_id == events[0]["model_id"]  # the first in history order wins, for every reader


# ------------------------------------------------------------------ damaged files get named errors


def _truncate(storage: ArtifactStorage, key: str) -> None:
    data = storage.read_bytes(key)
    storage.write_bytes(key, data[: len(data) // 2])


def test_a_truncated_history_event_is_named(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    promote(storage, "m-a", None)
    key = event_keys(storage)[0]
    _truncate(storage, key)
    with pytest.raises(ProductionStateError, match="truncated or invalid JSON") as info:
        replay_history(storage)
    assert storage.uri(key) in str(info.value) and "restore it from a backup" in str(info.value)
    storage.write_json(key, {"event": "promoted", "at": "x"})  # valid JSON, not an event
    with pytest.raises(ProductionStateError, match="lacks") as info:
        current_champion(storage)
    assert storage.uri(key) in str(info.value)


def test_a_truncated_legacy_history_is_named(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    storage.write_bytes(LEGACY_HISTORY_KEY, b'[{"event": "promoted", "model_id": "m-a", "at"')
    with pytest.raises(ProductionStateError) as info:
        replay_history(storage)
    assert storage.uri(LEGACY_HISTORY_KEY) in str(info.value) and "restore" in str(info.value)


def test_truncated_current_and_serving_files_are_named_with_the_fix(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    promote(storage, "m-a", None)
    publish_pointers(storage)
    assert current_champion(storage)["model_id"] == "m-a"
    assert serving_record(storage)["model_id"] == "m-a"
    _truncate(storage, CURRENT_KEY)
    with pytest.raises(ProductionStateError) as info:
        current_champion(storage)
    assert storage.uri(CURRENT_KEY) in str(info.value) and "cvops run --select onnx_runtime" in str(info.value)
    _truncate(storage, SERVING_KEY)
    with pytest.raises(ProductionStateError) as info:
        serving_record(storage)
    assert storage.uri(SERVING_KEY) in str(info.value) and "cvops run --select onnx_runtime" in str(info.value)
    storage.write_json(SERVING_KEY, {"model_id": "m-a"})  # valid JSON, fields missing: no bare KeyError
    with pytest.raises(ProductionStateError, match="not a serving pointer"):
        serving_record(storage)


def test_a_truncated_decision_is_named(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    decision = Decision(
        decision_id="d-1", kind="keep", target_model_id="m-a", challenger_id="m-a", champion_id="m-a", last_event_id=None,
        dataset_version="ds", reason="r", metrics={}, no_regression={"passed": True}, decided_at="now",
    )  # fmt: skip
    write_decision(storage, decision)
    assert read_decision(storage, "d-1") == decision
    _truncate(storage, "production/decisions/d-1.json")
    with pytest.raises(ProductionStateError) as info:
        read_decision(storage, "d-1")
    assert storage.uri("production/decisions/d-1.json") in str(info.value) and "production_model" in str(info.value)


def test_cvops_predict_reports_a_truncated_pointer_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = ArtifactStorage(str(tmp_path))
    promote(storage, "m-a", None)
    publish_pointers(storage)
    _truncate(storage, SERVING_KEY)
    assert cli.main(["predict", "--artifacts", str(tmp_path), str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert f"cvops: error: {storage.uri(SERVING_KEY)}: truncated or invalid JSON" in err
    assert "Traceback" not in err and "JSONDecodeError:" not in err


# ------------------------------------------------------------------ serving.json against the history


def test_serving_json_edited_to_another_models_runtime_is_refused(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    promote(storage, "m-a", None, "a")
    promote(storage, "m-b", "m-a", "b")
    publish_pointers(storage)
    assert serving_record(storage)["fp32_key"] == runtime("m-b", "b")["fp32_key"]
    # The champion's name kept, another model's runtime pinned by its own (matching) hash.
    edited = {**runtime("m-a", "a"), "model_id": "m-b"}
    storage.write_json(SERVING_KEY, edited)
    with pytest.raises(ProductionStateError) as info:
        serving_record(storage)
    message = str(info.value)
    assert edited["fp32_key"] in message and runtime("m-b", "b")["fp32_key"] in message
    assert "cvops run --select onnx_runtime" in message and "not signatures" in message
    with pytest.raises(ProductionStateError):
        open_production_predictor(storage)


def test_the_embedded_model_id_must_be_the_champions(tmp_path: Path) -> None:
    from tests.unit.onnx_testkit import export_trained

    storage, key = export_trained(str(tmp_path), model_id="m-test")  # the file embeds m-test
    import hashlib

    digest = hashlib.sha256(storage.read_bytes(key)).hexdigest()
    pinned = {"model_id": "m-a", "dataset_version": "ds", "fp32_key": key, "fp32_sha256": digest, "int8_key": None, "int8_sha256": None}
    append_event(storage, "promoted", "m-a", replaces=None, runtime=pinned)
    storage.write_json(SERVING_KEY, pinned)
    assert serving_record(storage)["model_id"] == "m-a"  # the pointer is what the history published...
    with pytest.raises(RuntimeModelError, match="embeds model 'm-test'.*production serves 'm-a'"):
        open_production_predictor(storage)  # ...but the file is another model's


def test_a_pointer_without_history_is_taken_as_published(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    storage.write_json(SERVING_KEY, runtime("m-a"))
    assert serving_record(storage) == runtime("m-a")
    assert json.loads((tmp_path / "production" / "serving.json").read_text())["model_id"] == "m-a"
