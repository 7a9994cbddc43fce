"""The bundled production stream: the partition of the digits, the batches and their shifts,
the delayed labels seeded for part of them, and seeding onto a folder and onto S3."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvops_dagster.ingestion.labels import parse_delayed_labels
from cvops_dagster.ingestion.landing import LABELS_FILE, READY_MARKER, LandingZone
from cvops_dagster.ingestion.production import list_production_batches, production_batch, production_batch_labels
from cvops_dagster.ingestion.sample_data import (
    SAMPLE_BATCHES,
    digit_labels,
    labelled_and_production_indices,
    labelled_batches,
    png_bytes,
    seed_landing,
)
from cvops_dagster.monitoring import sample_stream as S

DIGITS = {str(d) for d in range(10)}
SIZES = {"prod_001": 150, "prod_002": 120, "prod_003": 240}
LABELLED = {"prod_001": 75, "prod_002": 0, "prod_003": 204}


@pytest.fixture(scope="module")
def stream() -> list[S.StreamBatch]:
    return S.production_stream()


def test_partition_is_disjoint_complete_and_stratified() -> None:
    labels = digit_labels()
    parts = S.production_partition()
    assert list(parts) == ["labelled", "prod_001", "prod_002", "prod_003", S.HOLDOUT]
    seen: set[int] = set()
    for name, indices in parts.items():
        assert not seen & set(indices.tolist()), f"{name} overlaps an earlier part"
        seen |= set(indices.tolist())
        assert set(labels[indices].tolist()) == set(range(10)), f"{name} misses a digit"
    assert seen == set(range(len(labels))) == set(range(1797))
    labelled, pool = labelled_and_production_indices()
    assert np.array_equal(parts["labelled"], labelled)
    assert 0.3 <= len(pool) / 1797 <= 0.4
    assert sorted(np.concatenate([parts[n] for n in (*SIZES, S.HOLDOUT)]).tolist()) == pool.tolist()


def test_labelled_batches_hold_only_labelled_digits_and_every_digit() -> None:
    labels = digit_labels()
    labelled, _ = labelled_and_production_indices(labels)
    batches = labelled_batches(labels)
    assert list(batches) == list(SAMPLE_BATCHES)
    assert sorted(np.concatenate(list(batches.values())).tolist()) == labelled.tolist()
    for indices in batches.values():
        assert np.bincount(labels[indices], minlength=10).min() >= 30


def test_partition_rule_is_a_pure_function_of_the_labels() -> None:
    labels = np.array([0, 1] * 16)
    labelled, pool = labelled_and_production_indices(labels)
    # Ranks 1, 4, 6 of every 8 within each class: 6 of the 16 of each label.
    assert len(pool) == 12 and len(labelled) == 20
    assert pool.tolist()[:6] == [2, 3, 8, 9, 12, 13]


def test_batches_sizes_shifts_and_images(stream: list[S.StreamBatch]) -> None:
    assert [b.batch_id for b in stream] == list(S.STREAM_BATCHES) == list(SIZES)
    assert [b.shift for b in stream] == [None, "rotation_30", "new_camera"]
    for batch in stream:
        assert len(batch.files) == SIZES[batch.batch_id]
        assert list(batch.files) == [S.file_name(k) for k in range(len(batch.files))]
        assert set(batch.labels) == set(batch.files) == set(batch.sources)
        assert set(batch.labels.values()) == DIGITS
        with Image.open(io.BytesIO(next(iter(batch.files.values())))) as image:
            assert image.mode == "L"
            assert image.size == ((40, 40) if batch.shift == "new_camera" else (32, 32))
    parts = S.production_partition()
    for batch in stream:
        assert sorted(batch.sources.values()) == sorted(parts[batch.batch_id].tolist())


def test_stream_is_deterministic(stream: list[S.StreamBatch]) -> None:
    again = S.production_stream()
    assert [b.files for b in again] == [b.files for b in stream]
    assert [b.labels for b in again] == [b.labels for b in stream]


def test_delayed_labels_cover_the_documented_share_of_the_batch_only(stream: list[S.StreamBatch]) -> None:
    for batch in stream:
        delivered = S.delayed_labels(batch.batch_id)
        assert len(delivered) == LABELLED[batch.batch_id]
        assert len(delivered) == round(batch.labelled_share * len(batch.files))
        assert set(delivered) <= set(batch.files)
        assert all(batch.labels[name] == label for name, label in delivered.items())
        assert batch.delayed_labels == delivered
    assert set(S.delayed_labels("prod_003").values()) == DIGITS
    with pytest.raises(ValueError, match="prod_001"):
        S.delayed_labels("prod_999")


def test_drifted_holdout_is_disjoint_and_shifted(stream: list[S.StreamBatch]) -> None:
    images, labels = S.drifted_holdout()
    parts = S.production_partition()
    assert len(images) == len(labels) == len(parts[S.HOLDOUT]) >= 140
    assert set(labels.tolist()) == set(range(10))
    assert np.array_equal(labels, digit_labels()[parts[S.HOLDOUT]])
    assert not set(parts[S.HOLDOUT].tolist()) & set(stream[2].sources.values())
    assert all(image.shape == (40, 40) and image.dtype == np.uint8 for image in images)
    plain, same = S.drifted_holdout("none")
    assert np.array_equal(same, labels) and plain[0].shape == (32, 32)
    rotated, _ = S.drifted_holdout("rotation_15")
    assert rotated[0].shape == (32, 32) and not np.array_equal(rotated[0], plain[0])
    with pytest.raises(ValueError, match="new_camera"):
        S.drifted_holdout("fog")


def _check_seeded_zone(zone: LandingZone, with_labels: bool = True) -> None:
    assert list_production_batches(zone) == list(S.STREAM_BATCHES)
    for batch_id in S.STREAM_BATCHES:
        batch = production_batch(zone, batch_id)
        assert len(batch.files) == SIZES[batch_id] and not batch.rejected
        parsed = production_batch_labels(zone, batch, DIGITS)
        if not with_labels or not LABELLED[batch_id]:
            assert parsed is None
            continue
        assert parsed is not None and parsed.ok, parsed
        assert not parsed.rejected and not parsed.quarantined
        assert parsed.labels == S.delayed_labels(batch_id)


def test_seed_local_landing_zone(tmp_path: Path, stream: list[S.StreamBatch]) -> None:
    root = tmp_path / "landing"
    labelled = seed_landing(str(root))
    counts = S.seed_production(str(root))
    assert counts == SIZES
    assert sum(labelled.values()) == 1797 - sum(len(v) for k, v in S.production_partition().items() if k != "labelled")
    zone = LandingZone(str(root))
    assert zone.list_complete_batches() == list(SAMPLE_BATCHES)  # "production" is no labelled batch
    _check_seeded_zone(zone)
    # Every image was written, _READY after all of them, and nothing else (no temporary files).
    pngs = {p.read_bytes() for p in root.rglob("*.png")}
    assert len(pngs) <= sum(labelled.values()) + sum(SIZES.values())
    for batch in stream:
        folder = root / "production" / batch.batch_id
        ready = folder / READY_MARKER
        assert ready.exists()
        for name, data in batch.files.items():
            assert (folder / name).read_bytes() == data
            assert os.stat(folder / name).st_mtime_ns <= ready.stat().st_mtime_ns
        expected = {READY_MARKER, *batch.files} | ({LABELS_FILE} if LABELLED[batch.batch_id] else set())
        assert {p.name for p in folder.iterdir()} == expected
        labels_file = folder / LABELS_FILE
        if labels_file.exists():
            assert labels_file.stat().st_mtime_ns >= ready.stat().st_mtime_ns
            parsed = parse_delayed_labels(labels_file.read_bytes(), set(batch.files), DIGITS)
            assert parsed.ok and parsed.rows == LABELLED[batch.batch_id] and not parsed.quarantined
    assert sorted(p.name for p in (root / "production").iterdir()) == list(S.STREAM_BATCHES)
    # The held-out digits never reach the landing zone.
    holdout, _ = S.drifted_holdout()
    assert not {png_bytes(image) for image in holdout} & pngs


def test_seed_without_labels_then_deliver_them_later(tmp_path: Path) -> None:
    root = str(tmp_path / "landing")
    S.seed_production(root, labels=False)
    zone = LandingZone(root)
    _check_seeded_zone(zone, with_labels=False)
    before = production_batch(zone, "prod_003")
    target = S.write_delayed_labels(root, "prod_003", S.delayed_labels("prod_003"))
    assert target == zone.labels_path("prod_003")
    after = production_batch(zone, "prod_003")
    assert after.fingerprint == before.fingerprint and after.labels_fingerprint is not None
    parsed = production_batch_labels(zone, after, DIGITS)
    assert parsed is not None and parsed.labels == S.delayed_labels("prod_003")
    # Replaced as a whole, and no temporary file is left anywhere.
    S.write_delayed_labels(root, "prod_003", {"img_0000.png": "7"})
    parsed = production_batch_labels(zone, production_batch(zone, "prod_003"), DIGITS)
    assert parsed is not None and parsed.labels == {"img_0000.png": "7"}
    assert sorted(p.name for p in (tmp_path / "landing" / "production").iterdir()) == list(S.STREAM_BATCHES)
    with pytest.raises(ValueError):
        S.write_delayed_labels(root, "../elsewhere", {})


def test_labels_csv_format() -> None:
    data = S.labels_csv({"b.png": "1", "a,b.png": "2"})
    assert data == b'file,label\n"a,b.png",2\nb.png,1\n'
    parsed = parse_delayed_labels(data, {"a,b.png", "b.png"}, DIGITS)
    assert parsed.labels == {"a,b.png": "2", "b.png": "1"}


def test_seed_production_on_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same stream on a real S3 endpoint (moto's server): listing, labels, later delivery."""
    from tests.s3server import s3_server

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with s3_server(("landing",)) as endpoint:
        root = "s3://landing/zone"
        assert S.seed_production(root, endpoint) == SIZES
        zone = LandingZone(root, endpoint_url=endpoint)
        _check_seeded_zone(zone)
        S.write_delayed_labels(root, "prod_002", {"img_0001.png": "4"}, endpoint)
        parsed = production_batch_labels(zone, production_batch(zone, "prod_002"), DIGITS)
        assert parsed is not None and parsed.labels == {"img_0001.png": "4"}
        first = production_batch(zone, "prod_001")
        assert zone.read_bytes("prod_001", first.files[0], production=True) == S.production_stream()[0].files[first.files[0]]
