"""image_batches_sensor: new complete batches become partitions and runs, once; failed runs are
retried, content changes (even back to an earlier state) are ingested again, and unchanged batches
are not re-listed file by file."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import SensorResult, build_sensor_context, instance_for_test, materialize

from resources.storage import ImageSource
from sensors.batches import image_batches_sensor


def make_batch(root: Path, batch: str, ready: bool = True, files: int = 2) -> None:
    folder = root / batch / "cat"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"{i}.png").write_bytes(b"fake-bytes-%d" % i)
    if ready:
        (root / batch / "_READY").write_text("")


def tick(instance, landing: Path, cursor: str | None):  # noqa: ANN001, ANN201
    # A context manager: ImageSource holds the `s3` resource, a nested resource (see test_production_sensors).
    with build_sensor_context(instance=instance, cursor=cursor, resources={"image_source": ImageSource(root=str(landing))}) as context:
        return image_batches_sensor(context)


def test_new_batch_then_nothing_then_incomplete(tmp_path: Path) -> None:
    make_batch(tmp_path, "b1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        assert isinstance(first, SensorResult)
        assert [r.partition_key for r in first.run_requests] == ["b1"]
        assert first.run_requests[0].run_key.startswith("b1:")
        assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["b1"]]
        assert set(json.loads(first.cursor)["batches"]) == {"b1"}

        # The daemon applies partition requests; do the same before the next tick.
        instance.add_dynamic_partitions("image_batches", ["b1"])
        second = tick(instance, tmp_path, first.cursor)
        assert second.run_requests == [] and second.dynamic_partitions_requests == []
        assert second.skip_reason is not None

        make_batch(tmp_path, "b2", ready=False)
        third = tick(instance, tmp_path, first.cursor)
        assert third.run_requests == [] and third.dynamic_partitions_requests == []

        (tmp_path / "b2" / "_READY").write_text("")
        fourth = tick(instance, tmp_path, first.cursor)
        assert [r.partition_key for r in fourth.run_requests] == ["b2"]
        assert [r.partition_keys for r in fourth.dynamic_partitions_requests] == [["b2"]]


def test_changed_batch_is_requested_again_without_new_partition(tmp_path: Path) -> None:
    make_batch(tmp_path, "b1")
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        instance.add_dynamic_partitions("image_batches", ["b1"])
        make_batch(tmp_path, "b1", files=3)  # a late file lands in a complete batch
        again = tick(instance, tmp_path, first.cursor)
        assert [r.partition_key for r in again.run_requests] == ["b1"]
        assert again.run_requests[0].run_key != first.run_requests[0].run_key
        assert again.dynamic_partitions_requests == []


def test_batch_already_ingested_elsewhere_is_not_requested_again(tmp_path: Path) -> None:
    from assets.ingestion import raw_images
    from resources.storage import ArtifactStore

    landing = tmp_path / "landing"
    make_batch(landing, "b1")
    with instance_for_test() as instance:
        # `cvops run` ingested b1 before the sensor ever ran (empty cursor).
        instance.add_dynamic_partitions("image_batches", ["b1"])
        materialize(
            [raw_images],
            instance=instance,
            partition_key="b1",
            resources={"image_source": ImageSource(root=str(landing)), "artifact_store": ArtifactStore(root=str(tmp_path / "a"))},
        )
        result = tick(instance, landing, None)
        assert result.run_requests == []
        assert set(json.loads(result.cursor)["batches"]) == {"b1"}
        make_batch(landing, "b1", files=3)
        changed = tick(instance, landing, result.cursor)
        assert [r.partition_key for r in changed.run_requests] == ["b1"]


def test_a_batch_changing_back_to_earlier_content_is_ingested_again(tmp_path: Path) -> None:
    make_batch(tmp_path, "b1", files=2)
    with instance_for_test() as instance:
        a = tick(instance, tmp_path, None)
        instance.add_dynamic_partitions("image_batches", ["b1"])
        make_batch(tmp_path, "b1", files=3)
        b = tick(instance, tmp_path, a.cursor)
        (tmp_path / "b1" / "cat" / "2.png").unlink()
        (tmp_path / "b1" / "_READY").write_text("again")
        back = tick(instance, tmp_path, b.cursor)
        keys = [r.run_key for r in (*a.run_requests, *b.run_requests, *back.run_requests)]
        assert len(keys) == 3 and len(set(keys)) == 3, keys


def test_unchanged_batches_are_not_listed_file_by_file(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from cvops_dagster.ingestion.landing import LandingZone

    for name in ("b1", "b2", "b3"):
        make_batch(tmp_path, name)
    calls: list[str] = []
    real = LandingZone.fingerprint
    monkeypatch.setattr(LandingZone, "fingerprint", lambda self, batch_id, production=False: calls.append(batch_id) or real(self, batch_id, production))
    with instance_for_test() as instance:
        first = tick(instance, tmp_path, None)
        assert sorted(calls) == ["b1", "b2", "b3"]
        instance.add_dynamic_partitions("image_batches", ["b1", "b2", "b3"])
        calls.clear()
        second = tick(instance, tmp_path, first.cursor)
        assert calls == [] and second.run_requests == []
        (tmp_path / "b2" / "_READY").write_text("touched")
        tick(instance, tmp_path, second.cursor)
        assert calls == ["b2"]


def test_a_failed_ingestion_is_requested_again_a_bounded_number_of_times(tmp_path: Path) -> None:
    from assets.ingestion import raw_images
    from resources.storage import ArtifactStore
    from sensors.batches import MAX_ATTEMPTS

    landing = tmp_path / "landing"
    make_batch(landing, "b1")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the artifact root should be: every write fails")
    with instance_for_test() as instance:
        result = tick(instance, landing, None)
        instance.add_dynamic_partitions("image_batches", ["b1"])
        keys = []
        for _ in range(MAX_ATTEMPTS + 2):
            if not result.run_requests:
                break
            (request,) = result.run_requests
            keys.append(request.run_key)
            outcome = materialize(
                [raw_images],
                instance=instance,
                partition_key="b1",
                tags={"dagster/run_key": request.run_key, **request.tags},
                raise_on_error=False,
                resources={"image_source": ImageSource(root=str(landing)), "artifact_store": ArtifactStore(root=str(blocked))},
            )
            assert not outcome.success
            result = tick(instance, landing, result.cursor)
        assert len(keys) == MAX_ATTEMPTS and len(set(keys)) == MAX_ATTEMPTS
        assert result.run_requests == []


def test_a_failed_ingestion_that_then_succeeds_is_not_requested_again(tmp_path: Path) -> None:
    from assets.ingestion import raw_images
    from resources.storage import ArtifactStore

    landing = tmp_path / "landing"
    make_batch(landing, "b1")
    with instance_for_test() as instance:
        first = tick(instance, landing, None)
        instance.add_dynamic_partitions("image_batches", ["b1"])
        (request,) = first.run_requests
        resources = {"image_source": ImageSource(root=str(landing)), "artifact_store": ArtifactStore(root=str(tmp_path / "a"))}
        materialize([raw_images], instance=instance, partition_key="b1", tags={"dagster/run_key": request.run_key}, resources=resources)
        again = tick(instance, landing, first.cursor)
        assert again.run_requests == []
