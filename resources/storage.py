"""Storage resources: the artifact store and the landing-zone image source.

These are the only places where the environment (``CVOPS_ARTIFACT_ROOT``, ``CVOPS_LANDING``,
``CVOPS_S3_ENDPOINT_URL``) is bound. S3 credentials are never configuration: botocore reads
them from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/profiles).
"""

from __future__ import annotations

import os
from typing import Any

from dagster import ConfigurableResource, EnvVar
from pydantic import PrivateAttr

from cvops_dagster.core import settings
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.core.storage import ArtifactStorage


def _env_or_default(name: str, default: str | None) -> Any:
    """An EnvVar (shown as such in the UI) when the variable is set, else the embedded default."""
    return EnvVar(name) if os.environ.get(name) else default


class ArtifactStore(ConfigurableResource):
    """Where every artifact goes: a local folder or ``s3://bucket/prefix``.

    Reads, atomic writes, listings and existence checks behave the same on both.
    """

    root: str = settings.DEFAULT_ARTIFACT_ROOT
    s3_endpoint_url: str | None = None

    _storage: ArtifactStorage | None = PrivateAttr(default=None)

    @property
    def storage(self) -> ArtifactStorage:
        if self._storage is None:
            self._storage = ArtifactStorage(settings.normalize_root(self.root), endpoint_url=self.s3_endpoint_url)
        return self._storage

    def read(self, key: str) -> bytes:
        return self.storage.read_bytes(key)

    def write(self, key: str, data: bytes) -> str:
        return self.storage.write_bytes(key, data)

    def list(self, prefix: str = "") -> list[str]:
        return self.storage.list(prefix)

    def exists(self, key: str) -> bool:
        return self.storage.exists(key)

    def uri(self, key: str) -> str:
        return self.storage.uri(key)


class ImageSource(ConfigurableResource):
    """The landing zone that image batches arrive in (folder or ``s3://...``)."""

    root: str = settings.DEFAULT_LANDING
    s3_endpoint_url: str | None = None

    def landing(self) -> LandingZone:
        return LandingZone(settings.normalize_root(self.root), endpoint_url=self.s3_endpoint_url)


def artifact_store_from_env() -> ArtifactStore:
    return ArtifactStore(
        # The project's default when the variable is unset: `dagster dev` or the daemon started by
        # hand from another folder still use <project>/.cvops (see core.settings).
        root=_env_or_default(settings.ARTIFACT_ROOT_ENV, settings.artifact_root()),
        s3_endpoint_url=_env_or_default(settings.S3_ENDPOINT_ENV, None),
    )


def image_source_from_env() -> ImageSource:
    return ImageSource(
        root=_env_or_default(settings.LANDING_ENV, settings.landing_root()),
        s3_endpoint_url=_env_or_default(settings.S3_ENDPOINT_ENV, None),
    )
