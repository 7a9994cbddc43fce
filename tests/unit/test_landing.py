"""Landing-zone listing: complete batches, and a reason for every entry that is not a file to ingest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvops_dagster.ingestion import landing as L
from cvops_dagster.ingestion.landing import LandingZone, classify, safe_relative_parts


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("cat/a.png", ["cat", "a.png"]),
        ("cat/sub/a.png", ["cat", "sub", "a.png"]),
        ("../a.png", None),
        ("cat/../../a.png", None),
        ("cat/..\\..\\a.png", None),
        ("/etc/passwd", None),
        ("cat//a.png", None),
        ("cat/./a.png", None),
        ("cat/a\x00.png", None),
    ],
)
def test_safe_relative_parts(rel: str, expected: list[str] | None) -> None:
    assert safe_relative_parts(rel) == expected


@pytest.mark.parametrize(
    ("rel", "kwargs", "reason"),
    [
        ("cat/a.png", {}, None),
        ("cat/a.png", {"is_link": True}, L.REJECT_SYMLINK),
        ("cat/a.png", {"is_regular": False}, L.REJECT_NOT_REGULAR),
        ("cat/a.png", {"size": 0}, L.REJECT_EMPTY_FILE),
        ("cat/.DS_Store", {}, L.REJECT_HIDDEN),
        (".cache/a.png", {}, L.REJECT_HIDDEN),
        ("a.png", {}, L.REJECT_NO_LABEL),
        ("../a.png", {}, L.REJECT_ESCAPES),
        ("cat/\udcff.png", {}, L.REJECT_BAD_NAME),
    ],
)
def test_classify(rel: str, kwargs: dict, reason: str | None) -> None:
    args = {"is_link": False, "is_regular": True, "size": 10} | kwargs
    assert classify(rel, **args).reason == reason


def test_complete_batches_only(tmp_path: Path) -> None:
    (tmp_path / "b1" / "cat").mkdir(parents=True)
    (tmp_path / "b1" / "_READY").write_text("")
    (tmp_path / "b2" / "cat").mkdir(parents=True)  # no _READY yet
    (tmp_path / ".hidden_batch").mkdir()
    (tmp_path / ".hidden_batch" / "_READY").write_text("")
    (tmp_path / "production" / "p1").mkdir(parents=True)
    (tmp_path / "production" / "p1" / "_READY").write_text("")
    zone = LandingZone(str(tmp_path))
    assert zone.list_complete_batches() == ["b1"]
    assert zone.list_complete_batches(production=True) == ["p1"]


def test_missing_landing_zone_lists_nothing(tmp_path: Path) -> None:
    assert LandingZone(str(tmp_path / "nope")).list_complete_batches() == []


def test_fingerprint_changes_with_files(tmp_path: Path) -> None:
    (tmp_path / "b1" / "cat").mkdir(parents=True)
    (tmp_path / "b1" / "cat" / "a.png").write_bytes(b"1")
    zone = LandingZone(str(tmp_path))
    before = zone.fingerprint("b1")
    assert zone.fingerprint("b1") == before
    (tmp_path / "b1" / "cat" / "b.png").write_bytes(b"2")
    assert zone.fingerprint("b1") != before


def test_read_bytes_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "b1" / "cat").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    os.symlink(secret, tmp_path / "b1" / "cat" / "link.png")
    zone = LandingZone(str(tmp_path))
    with pytest.raises(OSError):
        zone.read_bytes("b1", "cat/link.png")
    with pytest.raises(ValueError):
        zone.read_bytes("b1", "../secret.txt")


def test_fingerprint_sees_a_same_size_replacement(tmp_path: Path) -> None:
    (tmp_path / "b1" / "cat").mkdir(parents=True)
    image = tmp_path / "b1" / "cat" / "a.png"
    image.write_bytes(b"1111")
    zone = LandingZone(str(tmp_path))
    before = zone.fingerprint("b1")
    image.write_bytes(b"2222")
    os.utime(image, ns=(1, 1))  # a different modification time, same size
    assert zone.fingerprint("b1") != before
