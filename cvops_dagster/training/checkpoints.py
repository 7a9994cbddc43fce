"""Training checkpoints: hashed on write, verified before every load, kept per run.

Lightning checkpoints are torch pickles. This system only ever loads checkpoints it wrote
itself, from its own checkpoint folder, whose bytes still match the SHA-256 sidecar recorded
at write time, and always with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from cvops_dagster.core.storage import ArtifactStorage

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
CHECKPOINT_PREFIX = "checkpoints"
_COMPLETE = "complete.json"


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
    accepted = read_sidecar(sidecar)
    actual = file_sha256(resolved)
    if actual not in accepted:
        raise CheckpointIntegrityError(
            f"refusing tampered checkpoint {resolved}: sha256 {actual} differs from the {accepted[0] if accepted else 'nothing'} "
            "recorded when it was written (the hash detects corruption and edits, it is not a signature)"
        )
    return resolved


def read_sidecar(sidecar: Path) -> list[str]:
    """The hashes a sidecar accepts: the checkpoint's, and during a save also the one before it."""
    return [line.strip() for line in sidecar.read_text().splitlines() if line.strip()]


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


def pending_sidecar(digest: str, previous: list[str]) -> str:
    """The sidecar text written before a checkpoint replaces ``previous``: both hashes accepted."""
    return "\n".join([digest, *previous[:1]]) + "\n"


def write_checkpoint_atomically(data: bytes, target: Path) -> None:
    """Write checkpoint bytes and their sidecar so a crash at any point leaves a loadable pair.

    The sidecar is written first and accepts both the new hash and the previous one; then the
    checkpoint is renamed into place; then the sidecar drops the previous hash. A crash before
    the rename leaves the old checkpoint (still accepted), after it the new one (accepted too),
    while a file matching neither is still refused.
    """
    digest = hashlib.sha256(data).hexdigest()
    sidecar = sidecar_path(target)
    previous = read_sidecar(sidecar) if sidecar.is_file() else []
    tmp = target.with_name(f".tmp-{target.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _replace_text(sidecar, pending_sidecar(digest, previous))
    tmp.replace(target)
    _replace_text(sidecar, digest + "\n")


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
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint_atomically(buffer.getvalue(), target)
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


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` at the end of every epoch, so a crash loses at most one epoch.

    (``ModelCheckpoint(save_last=True)`` only refreshes it when a top-k checkpoint is saved.)
    Subclassing :class:`Checkpoint` makes Lightning run it after early stopping has updated
    its state, like its own checkpoint callbacks.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimiser, loops


class LatestBestCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint, preferring the *later* epoch on ties.

    Small validation sets saturate (accuracy 1.0 for many epochs); the stock callback keeps
    the first epoch that reached the best value, mid-schedule at a high learning rate. On a
    tie the later epoch is the more converged model, so it replaces the earlier one.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best so far also when the run resumes in another local folder.

        A remote store's checkpoints are copied into a new private folder on every attempt; the
        stock callback then forgets the best score and the next epoch replaces a better best.
        The files are the same under the new folder, so their paths are moved over.
        """
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:

            def moved(path: Any) -> Any:
                return str(Path(self.dirpath) / Path(path).name) if path else path  # type: ignore[arg-type]

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None:
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        monitor_op = {"min": torch.le, "max": torch.ge}[self.mode]
        decision = bool(monitor_op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(decision)


class CheckpointFolder:
    """Local checkpoint folder of a run, mirrored to object storage when the store is remote."""

    def __init__(self, storage: ArtifactStorage, key: str, cache_dir: str | None) -> None:
        self.storage = storage
        self.prefix = f"{CHECKPOINT_PREFIX}/{key}"
        if storage.is_local:
            path = storage.local_path(self.prefix)
            assert path is not None
            self.path = path
            self._private = False
        else:
            # A private folder per run (never a shared /tmp/<key>): two runs of the same key on
            # one machine must not write over each other's copies. Removed by close().
            base = Path(cache_dir) if cache_dir else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"cvops-ckpt-{key[:40]}-", dir=base))
            self._private = True
            self._download()
        self.path.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Remove the private local copy of a remote run's checkpoints (the store keeps them)."""
        if self._private:
            shutil.rmtree(self.path, ignore_errors=True)

    def _download(self) -> None:
        for key in self.storage.list(self.prefix):
            target = self.path / key[len(self.prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.storage.read_bytes(key))

    def uploaded(self, path: Path) -> None:
        if self.storage.is_local:
            return
        relative = path.resolve().relative_to(self.path.resolve()).as_posix()
        key, sidecar_key = f"{self.prefix}/{relative}", f"{self.prefix}/{relative}{SIDECAR_SUFFIX}"
        digest = sidecar_path(path).read_text().split()[0]
        previous = self.storage.read_bytes(sidecar_key).decode().split() if self.storage.exists(sidecar_key) else []
        # The same order as write_checkpoint_atomically: a crash between the uploads leaves a
        # pair the next machine can resume from.
        self.storage.write_bytes(sidecar_key, pending_sidecar(digest, previous).encode())
        self.storage.write_bytes(key, path.read_bytes())
        self.storage.write_bytes(sidecar_key, (digest + "\n").encode())

    def removed(self, path: Path) -> None:
        if self.storage.is_local:
            return
        relative = path.resolve().relative_to(self.path.resolve()).as_posix()
        self.storage.delete(f"{self.prefix}/{relative}")
        self.storage.delete(f"{self.prefix}/{relative}.sha256")

    def reset(self) -> None:
        """Forget a finished run's checkpoints so a new run starts from scratch."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.storage.is_local:
            for key in self.storage.list(self.prefix):
                self.storage.delete(key)

    def mark_complete(self, info: dict[str, Any]) -> None:
        """Record that the run finished (in the store: the local copy may be gone by now)."""
        self.storage.write_json(f"{self.prefix}/{_COMPLETE}", info)

    def is_complete(self) -> bool:
        return self.storage.exists(f"{self.prefix}/{_COMPLETE}")

    @staticmethod
    def completion(storage: ArtifactStorage, key: str) -> dict[str, Any] | None:
        """What :meth:`mark_complete` recorded for run ``key``, or ``None`` if it never finished."""
        record_key = f"{CHECKPOINT_PREFIX}/{key}/{_COMPLETE}"
        if not storage.exists(record_key):
            return None
        try:
            return storage.read_json(record_key)
        except ValueError:  # a torn or edited record: treat the run as unfinished
            logger.warning("unreadable completion record %s: the run trains again", storage.uri(record_key))
            return None
