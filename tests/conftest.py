"""Shared test setup: telemetry off, and the Pillow corpus location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _name, _value in {
    "FIFTYONE_DO_NOT_TRACK": "true",
    "FIFTYONE_DATABASE_VALIDATION": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DAGSTER_DISABLE_TELEMETRY": "1",
}.items():
    os.environ.setdefault(_name, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]
PILLOW_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "pillow-test-images"


@pytest.fixture
def pillow_corpus() -> Path:
    """The shared corpus of odd and broken images; skipped with a reason when absent."""
    if not PILLOW_CORPUS.is_dir():
        pytest.skip(f"Pillow test-image corpus not found at {PILLOW_CORPUS} (only CI and developer checkouts have ../shared)")
    return PILLOW_CORPUS
