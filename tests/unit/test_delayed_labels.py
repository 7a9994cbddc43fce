"""Delayed labels (labels.csv): every hostile file gets its reason, rows add up, and nothing
outside the batch is ever labelled."""

from __future__ import annotations

import os
import random
import unicodedata
from pathlib import Path

import pytest

from cvops_dagster.ingestion import labels as LB
from cvops_dagster.ingestion.labels import (
    LabelsFileError,
    LabelsParse,
    load_delayed_labels,
    parse_delayed_labels,
    read_delayed_labels,
)
from cvops_dagster.ingestion.landing import LandingZone

FILES = {"a.png", "b.png", "c d.png", "with,comma.png", " spaced.png", "caf\u00e9.png"}
MODEL = {"cat", "dog"}
HEADER = b"file,label\n"


def check_invariants(parsed: LabelsParse, batch_files: set[str]) -> None:
    assert len(parsed.accepted) + len(parsed.rejected) == parsed.rows
    assert all(row.file in batch_files for row in parsed.accepted)
    assert len({row.file for row in parsed.accepted}) == len(parsed.accepted)
    assert all(row.reason is None for row in parsed.accepted)
    assert all(row.reason for row in parsed.rejected)
    if not parsed.ok:
        assert parsed.rows == 0 and not parsed.accepted and not parsed.rejected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", LB.LABELS_EMPTY),
        (b"\n\r\n  \n", LB.LABELS_EMPTY),
        (b"\xef\xbb\xbf", LB.LABELS_EMPTY),
        (b"file,label", LB.LABELS_TRUNCATED),
        (HEADER + b"a.png,cat\nb.png,d", LB.LABELS_TRUNCATED),  # still being written
        (HEADER + b"a.png,caf\xc3", LB.LABELS_TRUNCATED),  # cut inside a UTF-8 character
        (HEADER + b"a.png,\xff\xfe\n", LB.LABELS_NOT_UTF8),
        ("file,label\na.png,cat\n".encode("utf-16"), LB.LABELS_NOT_UTF8),
        (b"\x00" * 64 + b"\n", LB.LABELS_NUL),
        (HEADER + b"a.png\x00,cat\n", LB.LABELS_NUL),
        (b"name,label\na.png,cat\n", LB.LABELS_BAD_HEADER),
        (b"label,file\na.png,cat\n", LB.LABELS_BAD_HEADER),
        (b"file,label,score\na.png,cat,1\n", LB.LABELS_BAD_HEADER),
        (b"a.png,cat\n", LB.LABELS_BAD_HEADER),  # no header at all
        (b"file\n", LB.LABELS_BAD_HEADER),
        (HEADER + b'"a.png,cat\n', LB.LABELS_MALFORMED),  # an unterminated quote
        (HEADER + b'"a.png"x,cat\n', LB.LABELS_MALFORMED),
    ],
)
def test_whole_file_rejections(data: bytes, reason: str) -> None:
    parsed = parse_delayed_labels(data, FILES, MODEL)
    assert parsed.reason == reason, parsed
    assert not parsed.ok and parsed.labels == {}
    assert parsed.reason_counts() == {reason: 1}
    check_invariants(parsed, FILES)


def test_size_and_row_caps_reject_the_whole_file() -> None:
    big = HEADER + b"a.png,cat\n" * 100
    assert parse_delayed_labels(big, FILES, None, max_bytes=len(big) - 1).reason == LB.LABELS_TOO_LARGE
    assert parse_delayed_labels(big, FILES, None, max_bytes=len(big)).ok
    assert parse_delayed_labels(big, FILES, None, max_rows=99).reason == LB.LABELS_TOO_MANY_ROWS
    assert parse_delayed_labels(big, FILES, None, max_rows=100).rows == 100
    huge_field = HEADER + b"a" * 200_000 + b".png,cat\n"  # over the csv module's field limit
    assert parse_delayed_labels(huge_field, FILES, None).reason == LB.LABELS_MALFORMED


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (b"a.png,cat", None),
        (b"a.png", LB.ROW_TOO_FEW_COLUMNS),
        (b"a.png,cat,extra", LB.ROW_TOO_MANY_COLUMNS),
        (b"a.png,cat,", LB.ROW_TOO_MANY_COLUMNS),
        (b",cat", LB.ROW_EMPTY_FILE_NAME),
        (b"/etc/passwd,cat", LB.ROW_ABSOLUTE),
        (b"\\\\server\\share\\a.png,cat", LB.ROW_ABSOLUTE),
        (b"C:\\a.png,cat", LB.ROW_ABSOLUTE),
        (b"../a.png,cat", LB.ROW_ESCAPES),
        (b"../../b1/cat/x.png,cat", LB.ROW_ESCAPES),
        (b"sub/../a.png,cat", LB.ROW_ESCAPES),
        (b"..\\a.png,cat", LB.ROW_ESCAPES),
        (b"./a.png,cat", LB.ROW_BAD_PATH),
        (b"sub//a.png,cat", LB.ROW_BAD_PATH),
        (b"a\x01.png,cat", LB.ROW_BAD_PATH),
        (b"sub/a.png,cat", LB.ROW_UNKNOWN_FILE),  # production images sit at the top only
        (b"missing.png,cat", LB.ROW_UNKNOWN_FILE),
        (b"labels.csv,cat", LB.ROW_UNKNOWN_FILE),
        (b"_READY,cat", LB.ROW_UNKNOWN_FILE),
        (b"A.PNG,cat", LB.ROW_UNKNOWN_FILE),  # names are case-sensitive
        (b"a.png,", LB.ROW_EMPTY_LABEL),
        (b"a.png,   ", LB.ROW_EMPTY_LABEL),
        (b"a.png,cat/dog", LB.ROW_BAD_LABEL),
        (b"a.png,c\x07at", LB.ROW_BAD_LABEL),
        (b"a.png," + b"x" * 300, LB.ROW_BAD_LABEL),
        (b"a.png,zebra", LB.ROW_NOT_IN_MODEL),
        (b"a.png,Cat", LB.ROW_NOT_IN_MODEL),  # labels are case-sensitive
    ],
)
def test_row_reasons(row: bytes, reason: str | None) -> None:
    parsed = parse_delayed_labels(HEADER + row + b"\n", FILES, MODEL)
    assert parsed.ok and parsed.rows == 1
    outcome = (parsed.accepted + parsed.rejected)[0]
    assert outcome.reason == reason, outcome
    assert outcome.line == 2
    check_invariants(parsed, FILES)


def test_reading_rules_bom_crlf_quotes_whitespace_nfc() -> None:
    data = (
        "\ufeff File , LABEL \r\n"
        '"with,comma.png",cat\r\n'
        "  c d.png  ,  dog  \r\n"
        '" spaced.png",cat\r\n'
        + unicodedata.normalize("NFD", "caf\u00e9.png") + ",dog\r\n"
        "\r\n"
        "b.png,cat\r"
    ).encode("utf-8")
    parsed = parse_delayed_labels(data, FILES, MODEL)
    assert parsed.ok, parsed
    assert parsed.labels == {
        "with,comma.png": "cat",
        "c d.png": "dog",
        " spaced.png": "cat",
        "caf\u00e9.png": "dog",
        "b.png": "cat",
    }
    assert parsed.rows == 5 and parsed.blank_lines == 1 and not parsed.rejected


def test_names_match_exactly_first_then_by_nfc() -> None:
    nfc, nfd = "caf\u00e9.png", unicodedata.normalize("NFD", "caf\u00e9.png")
    files = {nfc, nfd}  # two files whose names differ only by normalisation
    both = parse_delayed_labels(f"file,label\n{nfc},cat\n{nfd},dog\n".encode(), files, MODEL)
    assert both.labels == {nfc: "cat", nfd: "dog"}  # exact names win
    only_nfd = parse_delayed_labels(f"file,label\n{nfd},cat\n".encode(), {nfc}, MODEL)
    assert only_nfd.labels == {nfc: "cat"}  # written decomposed, listed composed
    only_nfc = parse_delayed_labels(f"file,label\n{nfc},cat\n".encode(), {nfd}, MODEL)
    assert only_nfc.labels == {nfd: "cat"}  # and the other way round
    lookalike = parse_delayed_labels("file,label\ncafe\u200b.png,cat\n".encode(), files, MODEL)
    assert [r.reason for r in lookalike.rejected] == [LB.ROW_UNKNOWN_FILE]


def test_ambiguous_file_after_normalisation() -> None:
    # Listed: the NFC and NFD spellings of one name; asked: a third spelling, equal to both
    # after NFC but to neither exactly. It is never guessed.
    nfc = "\u1e69.png"  # s with dot below and dot above
    spellings = {unicodedata.normalize("NFC", nfc), unicodedata.normalize("NFD", nfc)}
    third = "\u1e61\u0323.png"  # s-dot-above + combining dot below: NFC equal, bytes different
    assert third not in spellings and unicodedata.normalize("NFC", third) == nfc
    parsed = parse_delayed_labels(f"file,label\n{third},cat\n".encode(), spellings, MODEL)
    assert [r.reason for r in parsed.rejected] == [LB.ROW_AMBIGUOUS_FILE]
    check_invariants(parsed, spellings)


def test_duplicates_and_conflicts() -> None:
    data = (
        HEADER
        + b"a.png,cat\n"
        + b"a.png,cat\n"  # identical repeat: one counts
        + b" a.png , cat \n"  # the same row, spelled differently
        + b"b.png,cat\n"
        + b"b.png,dog\n"  # conflicting: both go
        + b"c d.png,zebra\n"
        + b"c d.png,zebra\n"  # a repeated unknown label: quarantined once, the repeat a duplicate
        + b"with,comma.png,cat\n"  # unquoted comma: three fields
        + b'"with,comma.png",\n'  # empty label: takes no part in conflicts
        + b'"with,comma.png",dog\n'
    )
    parsed = parse_delayed_labels(data, FILES, MODEL)
    check_invariants(parsed, FILES)
    assert parsed.labels == {"a.png": "cat", "with,comma.png": "dog"}
    assert [(r.line, r.reason) for r in parsed.rejected] == [
        (3, LB.ROW_DUPLICATE),
        (4, LB.ROW_DUPLICATE),
        (5, LB.ROW_CONFLICT),
        (6, LB.ROW_CONFLICT),
        (7, LB.ROW_NOT_IN_MODEL),
        (8, LB.ROW_DUPLICATE),
        (9, LB.ROW_TOO_MANY_COLUMNS),
        (10, LB.ROW_EMPTY_LABEL),
    ]
    assert [(r.file, r.label) for r in parsed.quarantined] == [("c d.png", "zebra")]
    assert parsed.reason_counts() == {
        "conflicting_duplicate": 2,
        "duplicate": 3,
        "empty_label": 1,
        "label_not_in_model": 1,
        "too_many_columns": 1,
    }
    summary = parsed.summary()
    assert summary["rows"] == 10 and summary["accepted"] == 2 and summary["rejected"] == 8 and summary["quarantined"] == 1


def test_without_a_label_set_any_well_formed_label_counts() -> None:
    parsed = parse_delayed_labels(HEADER + b"a.png,zebra\nb.png,caf\xc3\xa9\n", FILES, None)
    assert parsed.labels == {"a.png": "zebra", "b.png": "caf\u00e9"}


def test_partial_coverage_and_header_only() -> None:
    assert parse_delayed_labels(HEADER, FILES, MODEL).ok
    assert parse_delayed_labels(HEADER, FILES, MODEL).rows == 0
    partial = parse_delayed_labels(HEADER + b"a.png,dog\n", FILES, MODEL)
    assert partial.labels == {"a.png": "dog"}


def test_random_bytes_never_raise_nor_label_outside_the_batch() -> None:
    rng = random.Random(13)
    seed = HEADER + b'a.png,cat\n"b.png",dog\n../x.png,cat\nc d.png,cat\n/etc/passwd,dog\n'
    alphabet = b'ab.,"\n\r\x00\xff\xc3/\\ ' + b"png"
    for _ in range(400):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data) + 1)
            action = rng.random()
            if action < 0.4:
                data.insert(pos, rng.choice(alphabet))
            elif action < 0.8 and pos < len(data):
                del data[pos]
            elif pos < len(data):
                data[pos] = rng.choice(alphabet)
        parsed = parse_delayed_labels(bytes(data), FILES, MODEL)
        check_invariants(parsed, FILES)


# --- reading labels.csv from the landing zone ---------------------------------------------


@pytest.fixture
def zone(tmp_path: Path) -> LandingZone:
    batch = tmp_path / "landing" / "production" / "p1"
    batch.mkdir(parents=True)
    (batch / "a.png").write_bytes(b"img")
    (batch / "_READY").write_bytes(b"")
    return LandingZone(str(tmp_path / "landing"))


def _labels(zone: LandingZone) -> Path:
    return Path(zone.root) / "production" / "p1" / "labels.csv"


def test_read_absent_present_and_capped(zone: LandingZone) -> None:
    assert read_delayed_labels(zone, "p1") is None
    assert load_delayed_labels(zone, "p1", {"a.png"}, MODEL) is None
    _labels(zone).write_bytes(HEADER + b"a.png,cat\n")
    assert read_delayed_labels(zone, "p1") == HEADER + b"a.png,cat\n"
    loaded = load_delayed_labels(zone, "p1", {"a.png"}, MODEL)
    assert loaded is not None and loaded.labels == {"a.png": "cat"}
    assert loaded.fingerprint == zone.labels_fingerprint("p1")
    with pytest.raises(LabelsFileError) as err:
        read_delayed_labels(zone, "p1", max_bytes=5)
    assert err.value.reason == LB.LABELS_TOO_LARGE
    capped = load_delayed_labels(zone, "p1", {"a.png"}, MODEL, max_bytes=5)
    assert capped is not None and capped.reason == LB.LABELS_TOO_LARGE
    with pytest.raises(ValueError):
        read_delayed_labels(zone, "../p1")


def test_symlinked_or_special_labels_file_is_refused(zone: LandingZone, tmp_path: Path) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_bytes(HEADER + b"a.png,cat\n")
    os.symlink(outside, _labels(zone))
    assert zone.labels_fingerprint("p1") is not None  # noticed, so the refusal gets recorded
    with pytest.raises(LabelsFileError) as err:
        read_delayed_labels(zone, "p1")
    assert err.value.reason == LB.LABELS_SYMLINK
    loaded = load_delayed_labels(zone, "p1", {"a.png"}, MODEL)
    assert loaded is not None and loaded.reason == LB.LABELS_SYMLINK and loaded.labels == {}
    _labels(zone).unlink()
    os.mkfifo(_labels(zone))  # must not block the reader
    loaded = load_delayed_labels(zone, "p1", {"a.png"}, MODEL)
    assert loaded is not None and loaded.reason == LB.LABELS_NOT_REGULAR


def test_a_file_being_written_is_rejected_then_picked_up(zone: LandingZone) -> None:
    labels = _labels(zone)
    labels.write_bytes(HEADER + b"a.png,ca")
    first = load_delayed_labels(zone, "p1", {"a.png"}, MODEL)
    assert first is not None and first.reason == LB.LABELS_TRUNCATED
    with labels.open("ab") as f:
        f.write(b"t\n")
    os.utime(labels, ns=(10**18, 10**18))  # coarse clocks: make the change visible
    second = load_delayed_labels(zone, "p1", {"a.png"}, MODEL)
    assert second is not None and second.labels == {"a.png": "cat"}
    assert second.fingerprint != first.fingerprint
