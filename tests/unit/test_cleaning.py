"""clean_dataset end to end on generated batches: outcomes, reasons, accounting, splits."""

from __future__ import annotations

import hashlib
import io
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvops_dagster.datasets.cleaning import AccountingError, CleaningConfig, check_accounting, clean_dataset
from cvops_dagster.core.storage import ArtifactStorage

from tests.unit.rawdata import digit_images, encode, raw_manifest, textured


def _smooth(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(1, 4, 2)
    field = np.sin(a * x * 3 + b * y * 2) + np.cos(b * x * y * 5)
    return Image.fromarray(np.clip((field + 2) * 60, 0, 255).astype(np.uint8), mode="L")


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture
def storage(tmp_path: Path) -> ArtifactStorage:
    return ArtifactStorage(str(tmp_path / "store"))


def _by_path(result) -> pd.DataFrame:
    return result.manifest.set_index("path")


def test_mixed_batch_outcomes_reasons_and_accounting(storage: ArtifactStorage) -> None:
    images, labels = digit_images(40)
    files = [(f"{lab}/d{i}.png", lab, encode(Image.fromarray(a))) for i, (a, lab) in enumerate(zip(images, labels))]
    near_source = _smooth(1)
    conflict = encode(_smooth(2))
    nfc = unicodedata.normalize("NFC", "7/café.png")
    nfd = unicodedata.normalize("NFD", "7/café.png")
    files += [
        ("3/d3_copy.png", "3", files[3][2]),  # same bytes, same label
        ("3/d3_as.bmp", "3", encode(Image.fromarray(images[3]), "BMP")),  # same pixels
        ("5/smooth.png", "5", encode(near_source)),
        ("5/smooth_reencoded.jpg", "5", _jpeg(near_source)),  # near duplicate
        ("1/conflict.png", "1", conflict),
        ("2/conflict.png", "2", conflict),  # same image, two labels
        ("8/empty.png", "8", b""),
        ("8/notes.png", "8", b"not an image\n"),
        ("8/truncated.jpg", "8", _jpeg(textured(64, 64, seed=3))[:300]),
        (nfc, "7", encode(textured(20, 20, seed=4, mode="L"))),
        (nfd, "7", encode(textured(20, 20, seed=5, mode="L"))),
    ]
    manifest = raw_manifest(storage, "batch_001", files)
    result = clean_dataset(storage, manifest, workers=2)
    rows = _by_path(result)

    assert rows.loc["3/d3_copy.png", "outcome"] == "duplicate"
    assert rows.loc["3/d3_copy.png", "reason"] == "exact"
    assert rows.loc["3/d3_as.bmp", "reason"] == "exact"
    assert rows.loc["3/d3_as.bmp", "alias_of"] == rows.loc["3/d3.png", "sample_id"]
    assert rows.loc["5/smooth_reencoded.jpg", "outcome"] == "duplicate"
    assert rows.loc["5/smooth_reencoded.jpg", "reason"] == "near"
    assert rows.loc["5/smooth.png", "outcome"] == "clean"
    for path in ("1/conflict.png", "2/conflict.png"):
        assert rows.loc[path, "outcome"] == "quarantined"
        assert rows.loc[path, "reason"] == "label_conflict"
    assert rows.loc["8/empty.png", "reason"] == "empty_file"
    assert rows.loc["8/notes.png", "reason"] == "format_not_allowed"
    assert rows.loc["8/truncated.jpg", "reason"] == "truncated"
    assert rows.loc[nfc, "outcome"] == rows.loc[nfd, "outcome"] == "clean"
    assert rows.loc[nfc, "record_id"] != rows.loc[nfd, "record_id"]

    summary = result.summary()
    assert summary["input"] == len(files)
    assert summary["clean"] + summary["duplicates"] + summary["quarantined"] == len(files)
    assert summary["duplicates"] == 3
    assert summary["quarantine_reasons"] == {"empty_file": 1, "format_not_allowed": 1, "label_conflict": 2, "truncated": 1}
    assert sum(summary["splits"].values()) == summary["clean"]
    assert sum(summary["classes"].values()) == summary["clean"]
    assert set(result.quarantine_examples["reason"]) == set(summary["quarantine_reasons"])

    # Written artifacts: manifest (one row per input record, NFD name intact) and dataset.json.
    stored = storage.read_parquet(result.manifest_key)
    assert len(stored) == len(files)
    assert nfd in set(stored["path"]) and nfc in set(stored["path"])
    check_accounting(stored, manifest["record_id"])
    info = storage.read_json(result.dataset_json_key)
    assert info["version"] == result.version and info["mode"] == "L" and info["channels"] == 1
    assert info["counts"]["input"] == len(files)
    clean_rows = stored[stored["outcome"] == "clean"]
    assert clean_rows["image_key"].notna().all()
    for key, raw_key in zip(clean_rows["image_key"], clean_rows["raw_image_key"], strict=True):
        data = storage.read_bytes(key)
        # Content addressed: the raw key itself when the raw file already is canonical.
        assert key.startswith("canonical/") or key == raw_key
        assert key.rsplit("/", 1)[1] == f"{hashlib.sha256(data).hexdigest()}.png"
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.mode == "L"
            assert set(image.info) <= {"dpi"}  # no metadata chunks beyond what Pillow infers


def test_rejected_raw_rows_are_not_inputs(storage: ArtifactStorage) -> None:
    manifest = raw_manifest(storage, "b", [("0/a.png", "0", encode(_smooth(6)))])
    rejected = manifest.iloc[[0]].assign(
        record_id="b/.hidden", path=".hidden", status="rejected", reason="hidden", image_key=None
    )
    result = clean_dataset(storage, pd.concat([manifest, rejected]), workers=1)
    assert result.summary()["input"] == 1
    assert result.manifest["record_id"].tolist() == ["b/0/a.png"]


def test_unlabelled_ingested_row_is_quarantined(storage: ArtifactStorage) -> None:
    manifest = raw_manifest(storage, "b", [("a.png", None, encode(_smooth(7))), ("1/b.png", "1", encode(_smooth(8)))])
    result = clean_dataset(storage, manifest, workers=1)
    assert result.summary()["quarantine_reasons"] == {"no_label": 1}


def test_mode_rule_picks_rgb_for_colour_datasets_and_converts_gray(storage: ArtifactStorage) -> None:
    files = [(f"c/{i}.png", "c", encode(textured(16, 16, seed=10 + i))) for i in range(4)]
    files.append(("g/gray.png", "g", encode(_smooth(9, 16))))
    result = clean_dataset(storage, raw_manifest(storage, "b", files), workers=1)
    assert result.mode == "RGB"
    gray = _by_path(result).loc["g/gray.png"]
    assert gray["mode"] == "L" and gray["canonical_mode"] == "RGB" and gray["channels"] == 3
    converted = Image.open(io.BytesIO(storage.read_bytes(gray["image_key"])))
    assert converted.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(converted)[..., 0], np.asarray(_smooth(9, 16)))


def test_mostly_gray_dataset_is_L(storage: ArtifactStorage) -> None:
    files = [(f"g/{i}.png", "g", encode(_smooth(20 + i))) for i in range(19)]
    files.append(("c/colour.png", "c", encode(textured(32, 32, seed=30))))
    result = clean_dataset(storage, raw_manifest(storage, "b", files), workers=1)
    assert result.mode == "L"
    assert _by_path(result).loc["c/colour.png", "canonical_mode"] == "L"


def test_version_is_deterministic_and_splits_are_stable_when_a_batch_is_added(storage: ArtifactStorage) -> None:
    images, labels = digit_images(120)
    encoded = [encode(Image.fromarray(a)) for a in images]
    first = raw_manifest(storage, "batch_001", [(f"{lab}/{i}.png", lab, d) for i, (d, lab) in enumerate(zip(encoded[:80], labels[:80]))])
    one = clean_dataset(storage, first, workers=1)
    again = clean_dataset(storage, first.sample(frac=1.0, random_state=0), workers=1)
    assert again.version == one.version

    second = raw_manifest(
        storage,
        "batch_002",
        [(f"{lab}/{i}.png", lab, d) for i, (d, lab) in enumerate(zip(encoded[80:], labels[80:]), start=80)]
        + [("0/copy.png", labels[0], encoded[0])],  # a later copy of an existing sample
        batch_index=1,
    )
    two = clean_dataset(storage, pd.concat([second, first]), workers=2)
    assert two.version != one.version
    before = one.manifest.set_index("record_id")
    after = two.manifest.set_index("record_id")
    clean_before = before[before["outcome"] == "clean"]
    assert (after.loc[clean_before.index, "outcome"] == "clean").all()
    assert (after.loc[clean_before.index, "split"] == clean_before["split"]).all()
    assert after.loc["batch_002/0/copy.png", "outcome"] == "duplicate"
    assert after.loc["batch_002/0/copy.png", "alias_of"] == before.loc["batch_001/0/0.png", "sample_id"]


@pytest.mark.parametrize("tamper", ["drop", "repeat", "no_reason", "bad_alias", "bad_outcome"])
def test_accounting_violations_raise(storage: ArtifactStorage, tamper: str) -> None:
    files = [(f"a/{i}.png", "a", encode(_smooth(40 + i))) for i in range(3)]
    files += [("a/dup.png", "a", files[0][2]), ("a/bad.png", "a", b"")]
    manifest = raw_manifest(storage, "b", files)
    result = clean_dataset(storage, manifest, workers=1)
    check_accounting(result.manifest, manifest["record_id"])
    frame = result.manifest.copy()
    if tamper == "drop":
        frame = frame.iloc[1:]
    elif tamper == "repeat":
        frame = pd.concat([frame, frame.iloc[[0]]])
    elif tamper == "no_reason":
        frame.loc[frame["outcome"] == "quarantined", "reason"] = None
    elif tamper == "bad_alias":
        frame.loc[frame["outcome"] == "duplicate", "alias_of"] = "nobody"
    else:
        frame.loc[0, "outcome"] = "maybe"
    with pytest.raises(AccountingError):
        check_accounting(frame, manifest["record_id"])


@pytest.mark.corpus
@pytest.mark.slow
def test_pillow_corpus_under_one_label_never_crashes_or_hangs(storage: ArtifactStorage, pillow_corpus: Path) -> None:
    files = [p for p in sorted(pillow_corpus.rglob("*")) if p.is_file()]
    assert len(files) > 500
    entries = [(f"odd/{p.relative_to(pillow_corpus).as_posix()}", "odd", p.read_bytes()) for p in files]
    entries = [e for e in entries if e[2]]  # ingestion rejects empty files itself
    manifest = raw_manifest(storage, "corpus", entries)
    config = CleaningConfig()
    result = clean_dataset(storage, manifest, config, workers=2)
    summary = result.summary()
    assert summary["input"] == len(entries)
    assert summary["clean"] + summary["duplicates"] + summary["quarantined"] == len(entries)
    check_accounting(storage.read_parquet(result.manifest_key), manifest["record_id"])
    assert summary["clean"] > 100 and summary["quarantined"] > 100
    assert result.mode == "RGB"
    reasons = summary["quarantine_reasons"]
    assert reasons.get("format_not_allowed", 0) > 50
    assert "decompression_bomb" in reasons
    clean = result.manifest[result.manifest["outcome"] == "clean"]
    assert set(clean["format"]) <= {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"}
    assert clean["canonical_mode"].eq("RGB").all()


def test_canonical_keys_reuse_canonical_raw_files_and_encode_only_clean_images(storage: ArtifactStorage) -> None:
    plain = encode(_smooth(40, 16))  # already a canonical PNG
    misnamed = encode(_smooth(41, 16))  # canonical PNG bytes stored under another extension
    bmp = encode(_smooth(42, 16), "BMP")  # needs encoding
    bmp_copy = encode(_smooth(40, 16), "BMP")  # same pixels as `plain`: an exact duplicate
    files = [("a/plain.png", "a", plain), ("a/misnamed.jpg", "a", misnamed), ("b/x.bmp", "b", bmp), ("a/y.bmp", "a", bmp_copy)]
    result = clean_dataset(storage, raw_manifest(storage, "b", files), workers=1)
    rows = _by_path(result)
    assert rows.loc["a/plain.png", "image_key"] == rows.loc["a/plain.png", "raw_image_key"]
    assert rows.loc["a/y.bmp", "outcome"] == "duplicate" and pd.isna(rows.loc["a/y.bmp", "image_key"])
    for path, expected in (("a/misnamed.jpg", misnamed), ("b/x.bmp", None)):
        key = rows.loc[path, "image_key"]
        assert key.startswith("canonical/")
        data = storage.read_bytes(key)
        assert key == f"canonical/{hashlib.sha256(data).hexdigest()}.png"
        if expected is not None:
            assert data == expected
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(storage.read_bytes(rows.loc["b/x.bmp", "image_key"])))), np.asarray(_smooth(42, 16))
    )
    # Only clean images were written: the duplicate BMP got no canonical file of its own.
    assert len(storage.list("canonical")) == 2


KEY_CASES = [
    "images/a.png", "", "/abs", "a//b", "a/", "a\\b", "a/./b", "a/../b", "./a", "../a", "a/.", "a/..",
    ".", "..", "a\nb", "a\n/b", "ok/.hidden", "a..b", "a/.b/c", "a/\n", "a/.\n", "\n", "images/ü.png",
]


@pytest.mark.parametrize("key", KEY_CASES)
def test_key_check_agrees_with_the_storage_rule(storage: ArtifactStorage, key: str) -> None:
    """Cleaning refuses, before reading anything, exactly the keys ArtifactStorage rejects."""
    from cvops_dagster.datasets.cleaning import _distinct_keys, ingested_records

    frame = raw_manifest(storage, "b", [(f"a/{n}.png", "a", encode(_smooth(60 + n, 8))) for n in range(3)])
    frame.loc[1, "image_key"] = key
    try:
        storage.local_path(key)
    except ValueError:
        storage_rejects = True
    else:
        storage_rejects = False
    records = ingested_records(frame)
    if storage_rejects and key.strip():
        with pytest.raises(ValueError, match="invalid artifact key"):
            _distinct_keys(records)
    else:  # valid, or blank (a record without a file: quarantined as missing_image)
        keys, _ = _distinct_keys(records)
        assert (key in keys) is bool(key.strip())


def test_invalid_raw_image_key_stops_cleaning(storage: ArtifactStorage) -> None:
    """A raw manifest naming a key outside the storage rule is refused, not read."""
    images, labels = digit_images(2)
    frame = raw_manifest(storage, "b1", [("ok.png", labels[0], encode(Image.fromarray(images[0])))])
    frame.loc[0, "image_key"] = "images/../../etc/passwd"
    with pytest.raises(ValueError, match="invalid artifact key"):
        clean_dataset(storage, frame, CleaningConfig(), workers=1)


def test_manifest_dtypes_do_not_depend_on_the_values(storage: ArtifactStorage) -> None:
    # All clean: reason, detail and alias columns hold no value at all.
    files = [(f"a/{i}.png", "a", encode(_smooth(70 + i))) for i in range(4)]
    manifest = raw_manifest(storage, "b", files)
    result = clean_dataset(storage, manifest, workers=1)
    assert set(result.manifest["outcome"]) == {"clean"}
    stored = storage.read_parquet(result.manifest_key)
    assert list(stored.columns) == list(result.manifest.columns)
    assert stored.dtypes.to_dict() == result.manifest.dtypes.to_dict()
    dtypes = stored.dtypes.map(str).to_dict()
    assert dtypes["reason"] == dtypes["alias_of"] == dtypes["record_id"] == "str"
    assert dtypes["orig_width"] == dtypes["file_size"] == "Int64"
    assert dtypes["animated"] == "boolean" and dtypes["sharpness"] == "float64"
    assert stored["reason"].isna().all()
    pd.testing.assert_frame_equal(stored, result.manifest)


def test_records_without_an_image_key_are_quarantined_and_ordered_by_ingestion(storage: ArtifactStorage) -> None:
    files = [(f"a/{i}.png", "a", encode(_smooth(80 + i))) for i in range(3)]
    manifest = raw_manifest(storage, "b", files)
    manifest.loc[1, "image_key"] = None
    manifest.loc[2, "image_key"] = "  "
    # Listed out of ingestion order: the manifest comes back ordered by (ingested_at, record_id).
    manifest.loc[0, "ingested_at"] = "2025-02-01T00:00:00+00:00"
    result = clean_dataset(storage, manifest, workers=1)
    rows = result.manifest.set_index("path")
    assert rows.loc["a/0.png", "outcome"] == "clean"
    for path in ("a/1.png", "a/2.png"):
        assert rows.loc[path, "outcome"] == "quarantined"
        assert rows.loc[path, "reason"] == "missing_image"
        assert pd.isna(rows.loc[path, "width"])
    assert result.manifest["path"].tolist() == ["a/1.png", "a/2.png", "a/0.png"]
    check_accounting(result.manifest, manifest["record_id"])


def test_no_record_with_an_image_key_quarantines_them_all(storage: ArtifactStorage) -> None:
    files = [(f"a/{i}.png", "a", encode(_smooth(90 + i))) for i in range(2)]
    manifest = raw_manifest(storage, "b", files)
    manifest["image_key"] = None
    result = clean_dataset(storage, manifest, workers=2)
    assert result.counts == {
        "input": 2, "clean": 0, "duplicates": 0, "quarantined": 2, "exact_duplicates": 0, "near_duplicates": 0
    }
    assert result.summary()["quarantine_reasons"] == {"missing_image": 2}
    assert result.pool.workers == 0  # nothing to decode: no worker started


def test_non_text_ids_are_written_as_text(storage: ArtifactStorage) -> None:
    files = [(f"a/{i}.png", "a", encode(_smooth(95 + i))) for i in range(2)]
    manifest = raw_manifest(storage, "b", files)
    manifest["batch_id"] = 7
    result = clean_dataset(storage, manifest, workers=1)
    assert storage.read_parquet(result.manifest_key)["batch_id"].tolist() == ["7", "7"]
    assert result.dataset_info["batches"] == ["7"]


def test_accounting_needs_the_outcome_columns(storage: ArtifactStorage) -> None:
    files = [("a/0.png", "a", encode(_smooth(99)))]
    manifest = raw_manifest(storage, "b", files)
    result = clean_dataset(storage, manifest, workers=1)
    with pytest.raises(AccountingError, match="alias_of"):
        check_accounting(result.manifest.drop(columns=["alias_of"]), manifest["record_id"])
