"""Storage resources: the artifact store, the landing-zone image source, and how to reach S3.

These are the only places where the environment (``CVOPS_ARTIFACT_ROOT``, ``CVOPS_LANDING``,
``CVOPS_S3_ENDPOINT_URL``) is bound.

S3 is reached through one configuration: dagster-aws's :class:`~dagster_aws.s3.S3Resource`
(resource key ``s3``; endpoint, region, profile, credentials, TLS, retries). Dagster code that
wants a boto3 client asks it for one (``s3.get_client()``); the artifact store and the image
source hold the same resource and open their fsspec/s3fs filesystem with the equivalent options
(:func:`s3fs_options`), so the two can never point at different endpoints or accounts. The bytes
themselves still move through s3fs (:class:`~cvops_dagster.core.storage.ArtifactStorage`): it
batches and streams reads, writes atomically (one PUT once the write is complete), and is shared
with the ``cvops`` commands that run outside Dagster. By default only the endpoint is set (from
``CVOPS_S3_ENDPOINT_URL``); credentials are never configuration: botocore reads them from the
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/profiles/instance roles), for
boto3 and s3fs alike, and for the S3 compute log manager of ``deploy/dagster.yaml``.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import ConfigurableResource, EnvVar
from dagster_aws.s3 import S3Resource
from pydantic import PrivateAttr

from cvops_dagster.core import settings
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.core.storage import ArtifactStorage


def _env_or_default(name: str, default: str | None) -> Any:
    """An EnvVar (shown as such in the UI) when the variable is set, else the embedded default."""
    return EnvVar(name) if os.environ.get(name) else default


def s3fs_options(s3: S3Resource | None) -> dict[str, Any]:
    """s3fs options that reach S3 exactly as ``s3.get_client()`` does.

    dagster-aws builds its client from a boto3 session (``profile_name``) with the endpoint,
    region, TLS settings, explicit credentials, and standard-mode retries of ``max_attempts``;
    s3fs takes the same settings under its own names. ``None`` (no S3 resource): botocore's
    defaults and environment chain, as for a bare boto3 client.
    """
    if s3 is None:
        return {}
    client_kwargs: dict[str, Any] = {}
    if s3.region_name:
        client_kwargs["region_name"] = s3.region_name
    if s3.verify is not None:
        client_kwargs["verify"] = s3.verify
    options: dict[str, Any] = {
        "use_ssl": s3.use_ssl,
        "anon": s3.use_unsigned_session,
        "config_kwargs": {"retries": {"max_attempts": s3.max_attempts, "mode": "standard"}},
    }
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    for name, option in (
        ("endpoint_url", "endpoint_url"),
        ("profile_name", "profile"),
        ("aws_access_key_id", "key"),
        ("aws_secret_access_key", "secret"),
        ("aws_session_token", "token"),
    ):
        value = getattr(s3, name)
        if value:
            options[option] = value
    return options


def _filesystem_options(root: str, s3: S3Resource | None) -> tuple[str | None, dict[str, Any]]:
    """The S3 endpoint and other s3fs options for an ``s3://`` root; nothing for a folder."""
    if not root.startswith("s3://"):
        return None, {}
    options = s3fs_options(s3)
    return options.pop("endpoint_url", None), options


class ArtifactStore(ConfigurableResource):
    """Where every artifact goes: a local folder or ``s3://bucket/prefix``.

    Reads, atomic writes, listings and existence checks behave the same on both. ``s3``: how
    to reach S3 (the deployment's ``s3`` resource); unset, botocore's defaults.
    """

    root: str = settings.DEFAULT_ARTIFACT_ROOT
    s3: S3Resource | None = None

    _storage: ArtifactStorage | None = PrivateAttr(default=None)

    @property
    def storage(self) -> ArtifactStorage:
        if self._storage is None:
            root = settings.normalize_root(self.root)
            endpoint, options = _filesystem_options(root, self.s3)
            self._storage = ArtifactStorage(root, endpoint_url=endpoint, storage_options=options)
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
    """The landing zone that image batches arrive in (folder or ``s3://...``); ``s3`` as for
    :class:`ArtifactStore`."""

    root: str = settings.DEFAULT_LANDING
    s3: S3Resource | None = None

    def landing(self) -> LandingZone:
        root = settings.normalize_root(self.root)
        endpoint, options = _filesystem_options(root, self.s3)
        return LandingZone(root, endpoint_url=endpoint, storage_options=options)


def s3_from_env() -> S3Resource:
    """The deployment's S3 access: the endpoint from ``CVOPS_S3_ENDPOINT_URL`` (unset: AWS),
    everything else botocore's environment chain (region, credentials, profile)."""
    return S3Resource(endpoint_url=_env_or_default(settings.S3_ENDPOINT_ENV, None))


def artifact_store_from_env(s3: S3Resource | None = None) -> ArtifactStore:
    return ArtifactStore(
        # The project's default when the variable is unset: `dagster dev` or the daemon started by
        # hand from another folder still use <project>/.cvops (see core.settings).
        root=_env_or_default(settings.ARTIFACT_ROOT_ENV, settings.artifact_root()),
        s3=s3 if s3 is not None else s3_from_env(),
    )


def image_source_from_env(s3: S3Resource | None = None) -> ImageSource:
    return ImageSource(
        root=_env_or_default(settings.LANDING_ENV, settings.landing_root()),
        s3=s3 if s3 is not None else s3_from_env(),
    )
