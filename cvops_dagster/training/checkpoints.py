"""Training checkpoints that are hashed on write and verified before every load.

Lightning checkpoints are torch pickles. This system only ever loads checkpoints it wrote
itself, from its own checkpoint folder, whose bytes still match the SHA-256 sidecar recorded
at write time, and always with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint is outside the allowed folder, lacks its hash record, or was modified."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def verify_checkpoint(path: str | Path, allowed_dir: str | Path) -> Path:
    """Check ``path`` lies inside ``allowed_dir`` and matches its recorded SHA-256.

    Returns:
        The resolved checkpoint path.

    Raises:
        CheckpointIntegrityError: with the reason, if any check fails.
    """
    resolved = Path(path).resolve()
    root = Path(allowed_dir).resolve()
    if not resolved.is_relative_to(root):
        raise CheckpointIntegrityError(f"refusing checkpoint {resolved}: it is outside this system's checkpoint folder {root}")
    if not resolved.is_file():
        raise CheckpointIntegrityError(f"refusing checkpoint {resolved}: not a regular file")
    sidecar = sidecar_path(resolved)
    if not sidecar.is_file():
        raise CheckpointIntegrityError(f"refusing checkpoint {resolved}: no recorded sha256 ({sidecar.name} missing)")
    expected = sidecar.read_text().strip()
    actual = file_sha256(resolved)
    if actual != expected:
        raise CheckpointIntegrityError(
            f"refusing tampered checkpoint {resolved}: sha256 {actual} differs from the {expected} recorded when it was written"
        )
    return resolved


def load_verified(path: str | Path, allowed_dir: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify then load a checkpoint with ``weights_only=True``."""
    resolved = verify_checkpoint(path, allowed_dir)
    return torch.load(resolved, map_location=map_location, weights_only=True)


class HashedCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes a SHA-256 sidecar and verifies it before loading.

    Args:
        allowed_dir: the only folder checkpoints may be loaded from.
        on_saved: called with the checkpoint path after each save (and its sidecar) is
            complete, e.g. to upload it to object storage.
        on_removed: called with the path of a checkpoint Lightning deleted.
    """

    def __init__(
        self,
        allowed_dir: str | Path,
        on_saved: Callable[[Path], None] | None = None,
        on_removed: Callable[[Path], None] | None = None,
    ) -> None:
        super().__init__()
        self.allowed_dir = Path(allowed_dir).resolve()
        self.on_saved = on_saved
        self.on_removed = on_removed

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        sidecar = sidecar_path(target)
        tmp = sidecar.with_name(f".tmp-{sidecar.name}")
        tmp.write_text(file_sha256(target) + "\n")
        tmp.replace(sidecar)
        if self.on_saved is not None:
            self.on_saved(target)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is forced on whatever the caller asks for.
        return load_verified(path, self.allowed_dir, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        sidecar_path(Path(path)).unlink(missing_ok=True)
        if self.on_removed is not None:
            self.on_removed(Path(path))
