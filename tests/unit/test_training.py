"""Training end to end on tiny generated datasets: learning, resume, integrity checks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cvops_dagster.training.augmentation import AugmentConfig
from cvops_dagster.training.checkpoints import CheckpointIntegrityError, HashedCheckpointIO, load_verified, sidecar_path
from cvops_dagster.training.model_store import ModelIntegrityError, load_model, model_keys
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.training.train import TrainConfig, train_model
from cvops_dagster.datasets.loading import load_dataset
from tests.unit.storage_kinds import RemoteLikeStorage
from tests.unit.synthetic_datasets import DatasetCache, clean_images, digits_images, only_version, shapes_dataset

TINY = {"width": 8, "batch_size": 16, "lr": 0.01}
FAST = TrainConfig(max_epochs=10, patience=10, num_threads=1, baseline=True, augment=AugmentConfig(crop_padding=1, rotation_deg=5.0))


class Crash(pl.Callback):
    """Simulates a crash at the end of an epoch, before that epoch's checkpoint is written
    (checkpoint callbacks run after the others), so the last checkpoint is the epoch before."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError("simulated crash")


class StartRecorder(pl.Callback):
    def __init__(self) -> None:
        self.start_epoch: int | None = None
        self.start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_epoch, self.start_step = trainer.current_epoch, trainer.global_step


@pytest.mark.parametrize(
    ("mode", "size", "n_classes"),
    [("L", (16, 16), 3), ("RGB", (20, 12), 2), ("RGB", (36, 36), 4)],
)
def test_training_learns_on_gray_and_rgb_of_any_size(tmp_path: Path, mode: str, size: tuple[int, int], n_classes: int) -> None:
    storage = ArtifactStorage(str(tmp_path))
    version = shapes_dataset(storage, n_classes=n_classes, per_class=40, size=size, mode=mode).version
    result = train_model(storage, version, TINY, FAST)
    chance = 1.0 / n_classes
    assert result.best_val_accuracy > chance + 0.2
    assert result.test_accuracy > chance
    assert result.baseline_accuracy is not None and 0.0 <= result.baseline_accuracy <= 1.0
    assert result.dataset_version == version
    assert storage.exists(result.model_card_key) and storage.exists(result.weights_key)
    assert result.confusion_matrix_png.startswith(b"\x89PNG") and result.learning_curves_png.startswith(b"\x89PNG")
    assert len(result.history) == result.epochs_trained
    assert set(result.per_class) == set(load_dataset(storage, version).labels)
    card = storage.read_json(result.model_card_key)
    assert card["input_spec"]["channels"] == (3 if mode == "RGB" else 1)
    assert card["input_spec"]["height"] == size[1] and card["input_spec"]["width"] == size[0]
    for key in ("architecture", "hyperparameters", "labels", "dataset_version", "metrics", "code_version", "weights_sha256"):
        assert key in card

    # The stored model reproduces the reported test accuracy through the shared preprocessing.
    model, loaded_card = load_model(storage, result.model_id)
    data = load_dataset(storage, version)
    x = torch.from_numpy(preprocess(data.splits["test"].images, InputSpec.from_dict(loaded_card["input_spec"])))
    with torch.no_grad():
        accuracy = float((model(x).argmax(1).numpy() == data.splits["test"].targets).mean())
    assert accuracy == pytest.approx(result.test_accuracy)


@pytest.fixture
def small_dataset(tmp_path: Path, cleaned_datasets: DatasetCache) -> ArtifactStorage:
    storage = ArtifactStorage(str(tmp_path / "artifacts"))
    cleaned_datasets.shapes(storage, n_classes=2, per_class=24, size=(12, 12), mode="L")
    return storage


@pytest.fixture
def version(small_dataset: ArtifactStorage) -> str:
    """The version of the one cleaned dataset in ``small_dataset``."""
    return only_version(small_dataset)


def test_interrupted_run_resumes_from_checkpoint(small_dataset: ArtifactStorage, version: str) -> None:
    config = TrainConfig(max_epochs=4, patience=10, num_threads=1, baseline=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_model(small_dataset, version, TINY, config, callbacks=[Crash(at_epoch=2)])
    ckpts = [k for k in small_dataset.list("checkpoints") if k.endswith("last.ckpt")]
    assert len(ckpts) == 1 and small_dataset.exists(ckpts[0] + ".sha256")
    saved = load_verified(small_dataset.local_path(ckpts[0]), small_dataset.local_path("checkpoints"))
    steps_before = int(saved["global_step"])
    assert steps_before > 0

    recorder = StartRecorder()
    result = train_model(small_dataset, version, TINY, config, callbacks=[recorder])
    assert result.resumed_from_epoch == 1
    assert recorder.start_epoch == 2 and recorder.start_step == steps_before  # continued, not from scratch
    assert result.epochs_trained == 4
    assert result.global_step == steps_before * 2  # epochs 2 and 3 only added their own steps
    assert [h["epoch"] for h in result.history] == [0.0, 1.0, 2.0, 3.0]  # curves survived the crash

    # A finished run is reused as it is: unchanged inputs cost no training.
    reused_recorder = StartRecorder()
    reused = train_model(small_dataset, version, TINY, config, callbacks=[reused_recorder])
    assert reused.reused and reused.model_id == result.model_id and reused_recorder.start_epoch is None
    assert reused.test_accuracy == result.test_accuracy and reused.history == result.history

    # Asked not to reuse it, the finished run is not resumed either: it trains from scratch.
    again = StartRecorder()
    fresh = train_model(small_dataset, version, TINY, TrainConfig(**{**config.__dict__, "reuse_finished": False}), callbacks=[again])
    assert again.start_epoch == 0 and again.start_step == 0 and not fresh.reused


@pytest.mark.parametrize("tamper", ["flip_byte", "drop_sidecar", "forge_sidecar_elsewhere"])
def test_tampered_checkpoint_is_refused(small_dataset: ArtifactStorage, tamper: str, version: str) -> None:
    config = TrainConfig(max_epochs=3, patience=10, num_threads=1, baseline=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_model(small_dataset, version, TINY, config, callbacks=[Crash(at_epoch=1)])
    (key,) = [k for k in small_dataset.list("checkpoints") if k.endswith("last.ckpt")]
    path = small_dataset.local_path(key)
    assert path is not None
    if tamper == "flip_byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        match = "tampered"
    elif tamper == "drop_sidecar":
        sidecar_path(path).unlink()
        match = "no recorded sha256"
    else:
        # A valid-looking checkpoint + sidecar outside the checkpoint folder is still refused.
        outside = path.parents[2] / "elsewhere.ckpt"
        outside.write_bytes(path.read_bytes())
        sidecar_path(outside).write_text(sidecar_path(path).read_text())
        with pytest.raises(CheckpointIntegrityError, match="outside"):
            HashedCheckpointIO(path.parent).load_checkpoint(outside)
        return
    with pytest.raises(CheckpointIntegrityError, match=match):
        train_model(small_dataset, version, TINY, config)


def test_tampered_safetensors_is_refused(small_dataset: ArtifactStorage, version: str) -> None:
    result = train_model(small_dataset, version, TINY, TrainConfig(max_epochs=1, num_threads=1, baseline=False))
    model, card = load_model(small_dataset, result.model_id)
    assert card["weights_sha256"] == result.card["weights_sha256"]
    weights_key, _ = model_keys(result.model_id)
    data = bytearray(small_dataset.read_bytes(weights_key))
    data[-5] ^= 0x01
    small_dataset.write_bytes(weights_key, bytes(data))
    with pytest.raises(ModelIntegrityError, match="differs"):
        load_model(small_dataset, result.model_id)


def test_train_defaults_are_documented_and_seeded(small_dataset: ArtifactStorage, version: str) -> None:
    config = TrainConfig(max_epochs=2, num_threads=1, baseline=False, resume=False)
    first = train_model(small_dataset, version, None, config)
    second = train_model(small_dataset, version, None, config)
    assert first.params["width"] == second.params["width"] and first.params["lr"] > 0
    a, _ = load_model(small_dataset, first.model_id)
    b, _ = load_model(small_dataset, second.model_id)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert np.allclose(pa.numpy(), pb.numpy(), atol=1e-5), name


def test_remote_store_uses_local_cache_uploads_and_resumes(tmp_path: Path, cleaned_datasets: DatasetCache) -> None:
    storage = RemoteLikeStorage(str(tmp_path / "bucket"), storage_options={"auto_mkdir": True})
    assert not storage.is_local
    version = cleaned_datasets.shapes(storage, n_classes=2, per_class=24, size=(12, 12)).version
    config = TrainConfig(max_epochs=3, num_threads=1, baseline=False, cache_dir=str(tmp_path / "cache-a"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_model(storage, version, TINY, config, callbacks=[Crash(at_epoch=1)])
    uploaded = storage.list("checkpoints")
    assert any(k.endswith("/last.ckpt") for k in uploaded) and any(k.endswith("/last.ckpt.sha256") for k in uploaded)

    # Another machine (empty cache) picks the run up from the store.
    recorder = StartRecorder()
    other = TrainConfig(max_epochs=3, num_threads=1, baseline=False, cache_dir=str(tmp_path / "cache-b"))
    best = BestScoreRecorder()
    result = train_model(storage, version, TINY, other, callbacks=[recorder, best])
    assert result.resumed_from_epoch == 0 and recorder.start_epoch == 1
    assert storage.exists(result.model_card_key)
    # The best score so far survived the move to another local folder.
    assert best.at_start is not None


class BestScoreRecorder(pl.Callback):
    """The best-checkpoint callback's score when training (re)starts."""

    def __init__(self) -> None:
        self.at_start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from cvops_dagster.training.checkpoints import LatestBestCheckpoint

        (callback,) = [c for c in trainer.callbacks if isinstance(c, LatestBestCheckpoint)]
        self.at_start = None if callback.best_model_score is None else float(callback.best_model_score)


def test_twenty_classes_train_with_the_same_code(tmp_path: Path) -> None:
    """Labels, outputs and input spec follow the data: 20 classes (digits and their negatives)."""
    from PIL import ImageOps

    digits, labels = digits_images(size=16)
    images, names = [], []
    per_label: dict[str, int] = {}
    for image, label in zip(digits, labels, strict=True):
        for variant, name in ((image, label), (ImageOps.invert(image), f"neg{label}")):
            if per_label.get(name, 0) < 30:
                per_label[name] = per_label.get(name, 0) + 1
                images.append(variant)
                names.append(name)
    storage = ArtifactStorage(str(tmp_path))
    version = clean_images(storage, images, names).version
    result = train_model(storage, version, TINY, FAST)
    assert len(result.card["labels"]) == 20 and result.card["num_classes"] == 20
    assert result.test_accuracy > 0.3  # chance is 0.05


@pytest.mark.parametrize("crash_at", ["before_rename", "after_rename"])
def test_a_crash_between_checkpoint_and_sidecar_still_resumes(
    tmp_path: Path, crash_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between writing a checkpoint and its hash record leaves a pair that verifies:
    the old checkpoint (crash before the rename) or the new one (crash after it)."""
    from cvops_dagster.training import checkpoints

    target = tmp_path / "last.ckpt"
    checkpoints.write_checkpoint_atomically(b"epoch-1", target)
    real_replace = checkpoints._replace_text
    calls = {"n": 0}

    def dying_replace(path: Path, text: str) -> None:
        calls["n"] += 1
        # The first sidecar write (both hashes) happens; the second (new hash only) is where
        # an "after_rename" crash strikes.
        if crash_at == "after_rename" and calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        real_replace(path, text)

    original_rename = Path.replace

    def dying_rename(self: Path, other: Path) -> Path:
        if crash_at == "before_rename" and self.name == ".tmp-last.ckpt":
            raise KeyboardInterrupt("killed")
        return original_rename(self, other)

    monkeypatch.setattr(checkpoints, "_replace_text", dying_replace)
    monkeypatch.setattr(Path, "replace", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_checkpoint_atomically(b"epoch-2", target)
    monkeypatch.undo()
    expected = b"epoch-1" if crash_at == "before_rename" else b"epoch-2"
    assert target.read_bytes() == expected
    assert checkpoints.verify_checkpoint(target, tmp_path) == target.resolve()
    # Anything else is still refused.
    target.write_bytes(b"epoch-3")
    with pytest.raises(CheckpointIntegrityError, match="tampered"):
        checkpoints.verify_checkpoint(target, tmp_path)


def test_remote_runs_copy_checkpoints_to_a_private_folder_removed_after(
    tmp_path: Path, cleaned_datasets: DatasetCache
) -> None:
    storage = RemoteLikeStorage(str(tmp_path / "bucket"), storage_options={"auto_mkdir": True})
    version = cleaned_datasets.shapes(storage, n_classes=2, per_class=24, size=(12, 12)).version
    cache = tmp_path / "cache"
    train_model(storage, version, TINY, TrainConfig(max_epochs=1, num_threads=1, baseline=False, cache_dir=str(cache)))
    assert cache.is_dir() and not any(cache.iterdir()), "the run's private checkpoint copy was left behind"
    assert any(k.endswith("/last.ckpt") for k in storage.list("checkpoints"))
