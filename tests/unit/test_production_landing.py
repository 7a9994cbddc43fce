"""Production batches in the landing zone: top-level images only, control files apart, every
other entry rejected with its reason, and a batch fingerprint blind to delayed labels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvops_dagster.ingestion import landing as L
from cvops_dagster.ingestion.labels import parse_delayed_labels, read_delayed_labels
from cvops_dagster.ingestion.landing import LandingZone, classify
from cvops_dagster.ingestion.production import (
    list_production_batches,
    production_batch,
    production_batch_labels,
    production_run_key,
)


@pytest.mark.parametrize(
    ("rel", "kwargs", "reason"),
    [
        ("a.png", {}, None),
        ("a..png", {}, None),
        ("sub/a.png", {}, L.REJECT_IN_SUBFOLDER),
        ("cat/a.png", {}, L.REJECT_IN_SUBFOLDER),
        ("a.png", {"is_link": True}, L.REJECT_SYMLINK),
        ("a.png", {"is_regular": False}, L.REJECT_NOT_REGULAR),
        ("a.png", {"size": 0}, L.REJECT_EMPTY_FILE),
        (".DS_Store", {}, L.REJECT_HIDDEN),
        ("..a.png", {}, L.REJECT_HIDDEN),
        (".cache/a.png", {}, L.REJECT_HIDDEN),
        ("../a.png", {}, L.REJECT_ESCAPES),
        ("sub/../../a.png", {}, L.REJECT_ESCAPES),
        ("/a.png", {}, L.REJECT_ESCAPES),
        ("..\\a.png", {}, L.REJECT_ESCAPES),
        ("\udcff.png", {}, L.REJECT_BAD_NAME),
    ],
)
def test_classify_production(rel: str, kwargs: dict, reason: str | None) -> None:
    args = {"is_link": False, "is_regular": True, "size": 10} | kwargs
    entry = classify(rel, production=True, **args)
    assert entry.reason == reason
    assert entry.label is None


def _write(path: Path, data: bytes = b"img") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def zone(tmp_path: Path) -> LandingZone:
    """A landing zone with one labelled batch and one hostile production batch ``p1``."""
    root = tmp_path / "landing"
    _write(root / "b1" / "cat" / "x.png")
    _write(root / "b1" / "_READY", b"")
    batch = root / "production" / "p1"
    _write(batch / "a.png")
    _write(batch / "b.jpg")
    _write(batch / "a..png")
    _write(batch / "_READY", b"")
    _write(batch / "empty.png", b"")
    _write(batch / ".hidden.png")
    _write(batch / "sub" / "c.png")
    _write(batch / "cat" / "_READY")  # a marker's name is a control file only at the top
    _write(batch / "cat" / "labels.csv", b"file,label\n")
    (batch / "emptydir").mkdir()
    secret = _write(tmp_path / "secret.png", b"secret")
    os.symlink(secret, batch / "link.png")
    os.mkfifo(batch / "pipe.png")
    return LandingZone(str(root))


def test_production_listing_accounts_for_every_entry(zone: LandingZone) -> None:
    entries = {e.path: e.reason for e in zone.list_entries("p1", production=True)}
    assert entries == {
        "a.png": None,
        "a..png": None,
        "b.jpg": None,
        "empty.png": L.REJECT_EMPTY_FILE,
        ".hidden.png": L.REJECT_HIDDEN,
        "sub/c.png": L.REJECT_IN_SUBFOLDER,
        "cat/_READY": L.REJECT_IN_SUBFOLDER,
        "cat/labels.csv": L.REJECT_IN_SUBFOLDER,
        "emptydir/": L.REJECT_IN_SUBFOLDER,
        "link.png": L.REJECT_SYMLINK,
        "pipe.png": L.REJECT_NOT_REGULAR,
    }
    assert all(e.label is None for e in zone.list_entries("p1", production=True))


def test_control_files_are_not_entries(zone: LandingZone) -> None:
    batch = Path(zone.root) / "production" / "p1"
    before = production_batch(zone, "p1")
    assert before.labels_fingerprint is None
    _write(batch / "labels.csv", b"file,label\na.png,cat\n")
    after = production_batch(zone, "p1")
    assert "labels.csv" not in {e.path for e in after.entries}
    assert after.fingerprint == before.fingerprint and after.run_key == before.run_key
    assert after.labels_fingerprint is not None
    assert after.files == ["a..png", "a.png", "b.jpg"]
    assert after.rejected_reasons()[L.REJECT_IN_SUBFOLDER] == 4


def test_labels_change_moves_only_the_labels_fingerprint(zone: LandingZone) -> None:
    batch = Path(zone.root) / "production" / "p1"
    labels = _write(batch / "labels.csv", b"file,label\na.png,cat\n")
    first = production_batch(zone, "p1")
    labels.write_bytes(b"file,label\na.png,dog\n")  # same size, new content
    os.utime(labels, ns=(1, 1))
    second = production_batch(zone, "p1")
    assert second.fingerprint == first.fingerprint
    assert second.labels_fingerprint != first.labels_fingerprint
    labels.unlink()
    assert production_batch(zone, "p1").labels_fingerprint is None
    assert production_batch(zone, "p1").fingerprint == first.fingerprint
    # An image added does change the batch fingerprint, and with it the run key.
    _write(batch / "new.png")
    changed = production_batch(zone, "p1")
    assert changed.fingerprint != first.fingerprint
    assert changed.run_key == production_run_key("p1", changed.fingerprint) != first.run_key


def test_a_folder_named_labels_csv_is_no_labels_file(zone: LandingZone) -> None:
    batch = Path(zone.root) / "production" / "p1"
    _write(batch / "labels.csv" / "inner.png")
    assert zone.labels_fingerprint("p1") is None
    assert read_delayed_labels(zone, "p1") is None
    assert {e.path: e.reason for e in zone.list_entries("p1", production=True)}["labels.csv/inner.png"] == L.REJECT_IN_SUBFOLDER


def test_labelled_listing_never_sees_production(zone: LandingZone) -> None:
    root = Path(zone.root)
    _write(root / "production" / "_READY", b"")  # even a marker there does not make it a batch
    _write(root / "b1" / "labels.csv", b"file,label\n")  # only production batches have labels.csv
    assert zone.list_complete_batches() == ["b1"]
    assert list_production_batches(zone) == ["p1"]
    with pytest.raises(ValueError):
        zone.list_entries("production")
    b1 = {e.path: e.reason for e in zone.list_entries("b1")}
    assert b1 == {"cat/x.png": None, "labels.csv": L.REJECT_NO_LABEL}


def test_incomplete_and_symlinked_production_batches_are_not_listed(tmp_path: Path) -> None:
    root = tmp_path / "landing"
    _write(root / "production" / "waiting" / "a.png")
    _write(root / "elsewhere" / "_READY", b"")
    os.symlink(root / "elsewhere", root / "production" / "linked")
    assert list_production_batches(LandingZone(str(root))) == []
    other = tmp_path / "other"
    _write(other / "production" / "p9" / "_READY", b"")
    (tmp_path / "root2").mkdir()
    os.symlink(other / "production", tmp_path / "root2" / "production")
    assert list_production_batches(LandingZone(str(tmp_path / "root2"))) == []


def test_s3_production_batches_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rules on a real S3 endpoint (moto's server), one compact pass."""
    import boto3

    from tests.s3server import s3_server

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with s3_server(("landing",)) as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

        def put(key: str, body: bytes = b"img") -> None:
            s3.put_object(Bucket="landing", Key=f"zone/{key}", Body=body)

        put("b1/cat/x.png")
        put("b1/_READY", b"")
        put("production/_READY", b"")
        for key in ("a.png", "b.png", "_READY", ".hidden.png", "sub/c.png", "x/../y.png", "labels.csv/z.png"):
            put(f"production/p1/{key}", b"" if key == "_READY" else b"img")
        put("production/p1/empty.png", b"")
        put("production/p2/a.png")  # no _READY: not complete
        zone = LandingZone("s3://landing/zone", endpoint_url=endpoint)

        assert zone.list_complete_batches() == ["b1"]
        assert list_production_batches(zone) == ["p1"]
        entries = {e.path: e.reason for e in zone.list_entries("p1", production=True)}
        assert entries == {
            "a.png": None,
            "b.png": None,
            ".hidden.png": L.REJECT_HIDDEN,
            "empty.png": L.REJECT_EMPTY_FILE,
            "sub/c.png": L.REJECT_IN_SUBFOLDER,
            "x/../y.png": L.REJECT_ESCAPES,
            "labels.csv/z.png": L.REJECT_IN_SUBFOLDER,
        }
        before = production_batch(zone, "p1")
        assert before.labels_fingerprint is None and read_delayed_labels(zone, "p1") is None

        put("production/p1/labels.csv", b"file,label\na.png,cat\nsub/c.png,cat\n../b1/cat/x.png,cat\n")
        first = production_batch(zone, "p1")
        assert first.fingerprint == before.fingerprint and first.labels_fingerprint is not None
        parsed = production_batch_labels(zone, first, {"cat", "dog"})
        assert parsed is not None and parsed.labels == {"a.png": "cat"}
        assert [r.reason for r in parsed.rejected] == ["unknown_file", "path_escapes_batch"]
        assert parsed.fingerprint == first.labels_fingerprint

        put("production/p1/labels.csv", b"file,label\na.png,dog\nb.png,cat\n")
        second = production_batch(zone, "p1")
        assert second.fingerprint == before.fingerprint
        assert second.labels_fingerprint != first.labels_fingerprint
        data = read_delayed_labels(zone, "p1")
        assert data is not None
        assert parse_delayed_labels(data, set(second.files), None).labels == {"a.png": "dog", "b.png": "cat"}


def test_unusable_batch_folder_names_are_skipped_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "landing"
    _write(root / "production" / "ok" / "_READY", b"")
    _write(root / "production" / "a\\b" / "_READY", b"")
    _write(root / "production" / os.fsdecode(b"bad\xff") / "_READY", b"")
    zone = LandingZone(str(root))
    assert list_production_batches(zone) == ["ok"]
    for batch_id in list_production_batches(zone):
        production_batch(zone, batch_id)  # every listed id can be looked at
