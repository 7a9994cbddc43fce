"""Shared test setup: telemetry off, the Pillow corpus location, cached cleaned datasets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.unit.synthetic_datasets import DatasetCache

from cvops_dagster.core.settings import disable_telemetry

disable_telemetry()  # the one list of switches (core/settings.py), before anything imports them

REPO_ROOT = Path(__file__).resolve().parents[1]
PILLOW_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "pillow-test-images"


@pytest.fixture
def pillow_corpus() -> Path:
    """The shared corpus of odd and broken images; skipped with a reason when absent."""
    if not PILLOW_CORPUS.is_dir():
        pytest.skip(f"Pillow test-image corpus not found at {PILLOW_CORPUS} (only CI and developer checkouts have ../shared)")
    return PILLOW_CORPUS


@pytest.fixture(scope="session")
def cleaned_datasets(tmp_path_factory: pytest.TempPathFactory) -> DatasetCache:
    """Small cleaned datasets made by ingestion and cleaning, each built once per session
    and copied into the storage a test passes (see tests/unit/synthetic_datasets.py)."""
    # Imported here: the orchestration tests need no cleaning stack at collection time.
    from tests.unit.synthetic_datasets import DatasetCache

    return DatasetCache(tmp_path_factory.mktemp("cleaned-datasets"))
