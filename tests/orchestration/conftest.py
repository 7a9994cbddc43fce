"""Fixtures shared by the orchestration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.orchestration.monitoring_project import Project, trained_project


@pytest.fixture(scope="package")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """One trained project for the production-side tests (monitoring, review), trained once."""
    yield from trained_project(tmp_path_factory)
