"""The review library against a real FiftyOne database (the session's bundled mongod):
upsert idempotency, reviewers' labels kept, Brain runs and views on planted edge cases, and the
media cache on a real S3 endpoint (moto's server) and on hostile files.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.monitoring.predictions import NUMERIC_FEATURES
from cvops_dagster.review.brain import brain_keys
from cvops_dagster.review.build import build_review
from cvops_dagster.review.connection import database_from_env, configure, open_dataset
from cvops_dagster.review.dataset import KEY_FIELD, TAG_REVIEWED, upsert_rows
from cvops_dagster.review.media import MediaCache
from cvops_dagster.review.samples import ROW_COLUMNS
from cvops_dagster.review.views import EDGE_REASONS, VIEW_EDGE_CASES, VIEW_MISLABELED, ViewConfig
from tests.s3server import s3_server

CLASSES = 5
MODEL = "m-test-0001"


@pytest.fixture
def dataset() -> Iterator:
    configure(database_from_env())
    ds = open_dataset(f"lib_{uuid.uuid4().hex[:10]}", create=True)
    yield ds
    ds.delete()


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value % 256).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(storage_root: Path, n_test: int = 200, n_prod: int = 100, seed: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """A model's view of a test split and a production batch: embeddings clustered by class,
    confident correct logits, plus planted cases: one mislabeled test image, one low-confidence
    production image, one production image far from every test embedding."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, 16)) * 4
    rows, planted = [], {}
    for i in range(n_test + n_prod):
        group = "test_split" if i < n_test else "production"
        label = i % CLASSES
        embedding = centres[label] + rng.normal(size=16) * 0.5
        logits = np.full(CLASSES, -2.0) + rng.normal(size=CLASSES) * 0.1
        logits[label] = 3.0
        truth = str(label) if group == "test_split" else None
        if i == 17:  # mislabeled: confident prediction, another ground truth
            truth, planted["mislabeled"] = str((label + 1) % CLASSES), i
        if i == n_test + 5:  # an unsure prediction
            logits = np.zeros(CLASSES) + rng.normal(size=CLASSES) * 0.01
            planted["low_confidence"] = i
        if i == n_test + 9:  # nothing like the test split
            embedding = rng.normal(size=16) * 40
            planted["outlier"] = i
        probabilities = np.exp(logits) / np.exp(logits).sum()
        data = _png(i)
        sha = hashlib.sha256(data).hexdigest()
        key = f"images/{sha}.png"
        (storage_root / "images").mkdir(parents=True, exist_ok=True)
        (storage_root / key).write_bytes(data)
        rows.append({
            "key": f"{group}:{sha}" if group == "test_split" else f"{group}:b1:{sha}", "group": group, "sample_id": sha,
            "image_key": key, "batch_id": None if group == "test_split" else "b1", "source_path": f"file_{i:04d}.png",
            "model_id": MODEL, "dataset_version": "v1", "predicted_label": str(int(np.argmax(probabilities))),
            "confidence": float(probabilities.max()), "logits": np.log(probabilities).astype(np.float32),
            "embedding": embedding.astype(np.float32), "ground_truth": truth, "drift_batch": group == "production",
            **{name: float(rng.normal()) for name in NUMERIC_FEATURES},
        })  # fmt: skip
    return pd.DataFrame(rows)[ROW_COLUMNS], planted


def test_upsert_is_idempotent_and_keeps_reviews(dataset, tmp_path: Path) -> None:  # noqa: ANN001
    rows, _ = _rows(tmp_path, n_test=30, n_prod=20)
    paths = MediaCache(ArtifactStorage(str(tmp_path)), tmp_path / "media").paths(rows["image_key"].tolist())
    first = upsert_rows(dataset, rows, paths)
    assert (first.added, first.updated, first.removed) == (50, 0, 0) and len(dataset) == 50
    # A reviewer corrects a production sample in the App.
    sample = dataset.match_tags("production").first()
    import fiftyone as fo

    sample["ground_truth"] = fo.Classification(label="4")
    sample.tags.append(TAG_REVIEWED)
    sample.save()
    again = upsert_rows(dataset, rows.assign(confidence=0.5), paths)
    assert (again.added, again.updated) == (0, 50) and len(dataset) == 50
    assert len(set(dataset.values(KEY_FIELD))) == 50
    assert set(dataset.values("prediction.confidence")) == {0.5}
    reloaded = dataset[sample.id]
    assert reloaded.ground_truth.label == "4" and TAG_REVIEWED in reloaded.tags
    # A new test split: unreviewed samples of the old one go, reviewed ones stay.
    test_ids = dataset.match_tags("test_split").values("id")
    kept = dataset[test_ids[0]]
    kept.tags.append(TAG_REVIEWED)
    kept.save()
    production = rows[rows["group"] == "production"]
    third = upsert_rows(dataset, production, paths[-len(production):])
    assert third.removed == 29 and len(dataset) == 21
    with pytest.raises(ValueError, match="repeat a key"):
        upsert_rows(dataset, pd.concat([production, production]), paths[-len(production):] * 2)


def test_brain_runs_and_views_find_the_planted_cases(dataset, tmp_path: Path) -> None:  # noqa: ANN001
    rows, planted = _rows(tmp_path)
    media = MediaCache(ArtifactStorage(str(tmp_path)), tmp_path / "media")
    labels = [str(c) for c in range(CLASSES)]
    build = build_review(dataset, rows, media, MODEL, ["b1"], views=ViewConfig(edge_cases_per_criterion=5, mislabeled_top=20), labels=labels)
    # ground_truth is editable in the App's annotation panel, with the model's classes.
    assert dataset.active_label_schemas == ["ground_truth"] and dataset.label_schemas["ground_truth"]["classes"] == labels
    assert sorted(dataset.list_brain_runs()) == sorted(brain_keys(MODEL).values()) == sorted(build.brain.keys.values())
    assert build.brain.skipped == {}
    assert all(len(dataset.load_saved_view(name)) == count for name, count in build.views.items())
    assert build.views[VIEW_EDGE_CASES] > 0 and build.views["drift_b1"] == 100
    # The mislabeled test image ranks in the top 5% of likely_mislabeled's order.
    labelled = len(dataset.exists("ground_truth"))
    ranked = dataset.load_saved_view(VIEW_MISLABELED).values("source_path")
    mislabeled = f"file_{planted['mislabeled']:04d}.png"
    assert mislabeled in ranked[: max(1, int(0.05 * labelled))]
    # The planted production cases are edge cases, for their reasons.
    reasons = dict(zip(*dataset.match_tags("production").values(["source_path", EDGE_REASONS]), strict=True))
    assert "low_confidence" in reasons[f"file_{planted['low_confidence']:04d}.png"]
    assert "embedding_outlier" in reasons[f"file_{planted['outlier']:04d}.png"]
    assert build.preview_png is not None and build.preview_png.startswith(b"\x89PNG")
    # Building again: same samples, same runs, same views.
    again = build_review(dataset, rows, media, MODEL, ["b1"], views=ViewConfig(edge_cases_per_criterion=5, mislabeled_top=20))
    assert again.samples == build.samples and again.upsert.added == 0 and again.views == build.views
    # A new model: the old model's runs go, the new ones come; a batch no longer drifted loses its view.
    newer = build_review(dataset, rows.assign(model_id="m-test-0002"), media, "m-test-0002", [])
    assert sorted(dataset.list_brain_runs()) == sorted(brain_keys("m-test-0002").values())
    assert "drift_b1" not in dataset.list_saved_views() and "drift_b1" not in newer.views


def test_media_cache_on_s3_downloads_once_and_converts_other_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    png, tiff = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (6, 4), (10, 200, 30)).save(png, format="PNG")
    Image.new("RGB", (6, 4), (200, 10, 30)).save(tiff, format="TIFF")
    blobs = {"png": png.getvalue(), "tif": tiff.getvalue(), "ppm": b"P6\n999999 999999\n255\n" + b"\0" * 10}
    with s3_server() as endpoint:
        storage = ArtifactStorage("s3://cvops/review", endpoint_url=endpoint)
        keys = []
        for ext, data in blobs.items():
            key = f"images/{hashlib.sha256(data).hexdigest()}.{ext}"
            storage.write_bytes(key, data)
            keys.append(key)
        cache = MediaCache(storage, tmp_path / "media")
        paths = cache.paths(keys)
        assert cache.downloaded == 3 and cache.converted == 1
        assert all(Path(p).is_file() and Path(p).is_relative_to(tmp_path / "media") for p in paths)
        assert Path(paths[0]).read_bytes() == blobs["png"]  # a browser format: the bytes themselves
        with Image.open(paths[1]) as image:  # TIFF -> PNG for the browser
            assert image.format == "PNG" and image.size == (6, 4)
        assert Path(paths[2]).read_bytes() == blobs["ppm"]  # does not decode: raw bytes kept, sample kept
        # Reused: a second cache over the same folder downloads nothing.
        again = MediaCache(storage, tmp_path / "media")
        assert again.paths(keys) == paths and again.downloaded == 0


def test_media_cache_never_fails_on_hostile_files(tmp_path: Path, pillow_corpus: Path) -> None:
    storage = ArtifactStorage(str(tmp_path / "artifacts"))
    keys = []
    for path in sorted(p for p in pillow_corpus.rglob("*") if p.is_file())[:400]:
        data = path.read_bytes()
        if not data or len(data) > 2_000_000:
            continue
        key = f"images/{hashlib.sha256(data).hexdigest()}.{path.suffix.lstrip('.').lower() or 'bin'}"
        if key not in keys:
            storage.write_bytes(key, data)
            keys.append(key)
    cache = MediaCache(storage, tmp_path / "media")
    paths = cache.paths(keys)
    assert len(paths) == len(keys) and all(Path(p).is_file() for p in paths)
