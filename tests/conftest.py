"""Shared test setup: telemetry off, the Pillow corpus location, cached cleaned datasets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.unit.synthetic_datasets import DatasetCache

import os
import re
import tempfile

from cvops_dagster.core.settings import REVIEW_PREFIX_ENV, disable_telemetry

disable_telemetry()  # the one list of switches (core/settings.py), before anything imports them
# FiftyOne's database for this test session: a fresh folder (its bundled mongod starts there on
# first use and stops when the last client leaves), never the user's ~/.fiftyone. Set before
# anything imports fiftyone. End-to-end tests that start their own processes give each test a
# folder of its own (tests/e2e); in this process one connection serves the session, and each
# test gets its own review dataset name (``review_dataset_prefix`` below).
os.environ["FIFTYONE_DATABASE_DIR"] = tempfile.mkdtemp(prefix="cvops-test-fiftyone-")

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


@pytest.fixture(autouse=True)
def review_dataset_prefix(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A review dataset name of this test's own (``CVOPS_REVIEW_DATASET_PREFIX``), so tests
    sharing the session's FiftyOne database never see each other's samples."""
    prefix = "t_" + re.sub(r"[^A-Za-z0-9]+", "_", request.node.name)[:60] + "_" + os.urandom(3).hex()
    monkeypatch.setenv(REVIEW_PREFIX_ENV, prefix)
    return prefix


class DemoProject:
    """A folder where `cvops demo` ran once (default budget), and what it printed."""

    def __init__(self, root: Path, stdout: str) -> None:
        self.root = root
        self.stdout = stdout

    def env(self) -> dict[str, str]:
        """The project's folders as variables (the defaults `cvops demo` used in ``root``)."""
        return {
            "CVOPS_LANDING": str(self.root / "landing"),
            "CVOPS_ARTIFACT_ROOT": str(self.root / ".cvops"),
            "DAGSTER_HOME": str(self.root / ".dagster_home"),
            REVIEW_PREFIX_ENV: DEMO_REVIEW_PREFIX,
        }


DEMO_REVIEW_PREFIX = "demo_project"


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> DemoProject:
    """`cvops demo` on the bundled data with the default budget, run once for the session: the
    demo test (tests/test_cli.py) checks what it did, the UI tour (tests/e2e) looks at it in a
    browser. Tests that change the project (the demo test's rollback) run after the tour."""
    from tests.test_cli import cvops

    root = tmp_path_factory.mktemp("demo")
    out = cvops("demo", cwd=root, env={REVIEW_PREFIX_ENV: DEMO_REVIEW_PREFIX}).stdout
    return DemoProject(root, out)
