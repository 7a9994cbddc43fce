"""Storage stand-ins for tests: a folder that behaves like a remote (S3) store."""

from __future__ import annotations

from pathlib import Path

from cvops_dagster.core.storage import ArtifactStorage


class RemoteLikeStorage(ArtifactStorage):
    """A store that reports itself non-local (no file paths), like S3, backed by a folder.

    Create it with ``storage_options={"auto_mkdir": True}``.
    """

    @property
    def is_local(self) -> bool:
        return False

    def local_path(self, key: str) -> Path | None:
        return None
