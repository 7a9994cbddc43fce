"""Small cleaned datasets for the training, tuning and promotion tests, made by the product.

Images are generated (simple shapes in grayscale or RGB at any size, or scikit-learn's bundled
digits, so nothing downloads), written as a landing-zone batch
(``<root>/<batch_id>/<label>/<file>.png`` + ``_READY``), ingested with
:func:`~cvops_dagster.ingestion.ingest.ingest_batch` and cleaned with
:func:`~cvops_dagster.datasets.cleaning.clean_dataset`. A test therefore trains on exactly
what cleaning writes: the cleaned-dataset contract has one writer, and no test can pass on a
shape cleaning never produces.

:class:`DatasetCache` (the session fixture ``cleaned_datasets`` in ``tests/conftest.py``)
cleans each distinct dataset once per test session and copies cleaning's files, byte for
byte, into each test's own storage.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.cleaning import CleaningConfig, CleaningResult, clean_dataset
from cvops_dagster.ingestion.ingest import ingest_batch, read_raw_manifests
from cvops_dagster.ingestion.landing import READY_MARKER, LandingZone
from cvops_dagster.ingestion.sample_data import digit_images

SHAPES = ("hbar", "vbar", "circle", "cross", "square", "triangle")


def shape_image(kind: str, size: tuple[int, int], mode: str, rng: np.random.Generator) -> Image.Image:
    """One shape at a random position/scale on a noisy background.

    The per-pixel background noise makes every image distinct for cleaning (neither an exact
    nor a near duplicate of another), so a dataset keeps every generated image.
    """
    width, height = size
    background = rng.integers(0, 60, size=(height, width, 3 if mode == "RGB" else 1), dtype=np.uint8)
    image = Image.fromarray(background.squeeze(-1) if mode == "L" else background, mode=mode)
    draw = ImageDraw.Draw(image)
    s = min(width, height)
    r = int(rng.integers(max(2, s // 5), max(3, s // 3)))
    cx = int(rng.integers(r, width - r))
    cy = int(rng.integers(r, height - r))
    color = tuple(int(c) for c in rng.integers(160, 256, size=3)) if mode == "RGB" else int(rng.integers(160, 256))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif kind == "hbar":
        draw.rectangle((cx - r, cy - max(1, r // 3), cx + r, cy + max(1, r // 3)), fill=color)
    elif kind == "vbar":
        draw.rectangle((cx - max(1, r // 3), cy - r, cx + max(1, r // 3), cy + r), fill=color)
    else:
        t = max(1, r // 4)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=color)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=color)
    return image


def shape_images(
    n_classes: int = 3, per_class: int = 40, size: tuple[int, int] = (24, 24), mode: str = "L", seed: int = 0
) -> tuple[list[Image.Image], list[str]]:
    """``n_classes`` x ``per_class`` shape images (``size`` is width, height) and their labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(n_classes):
        kind = SHAPES[k % len(SHAPES)]
        for _ in range(per_class):
            images.append(shape_image(kind, size, mode, rng))
            labels.append(kind if k < len(SHAPES) else f"{kind}{k}")
    return images, labels


def digits_images(size: int = 32) -> tuple[list[Image.Image], list[str]]:
    """The product's bundled sample digits (:mod:`cvops_dagster.ingestion.sample_data`) as images."""
    arrays, targets = digit_images(size)
    return [Image.fromarray(a, mode="L") for a in arrays], [str(int(t)) for t in targets]


def write_landing_batch(root: Path, batch_id: str, images: Sequence[Image.Image], labels: Sequence[str]) -> None:
    """Write a complete landing-zone batch: ``<root>/<batch_id>/<label>/<i>.png``, then ``_READY``."""
    if len(images) != len(labels):
        raise ValueError("images and labels differ in length")
    batch = root / batch_id
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = batch / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png", format="PNG")
    (batch / READY_MARKER).write_bytes(b"")


def clean_images(
    storage: ArtifactStorage,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    *,
    batch_id: str = "synthetic",
    config: CleaningConfig = CleaningConfig(),
    keep_all: bool = True,
) -> CleaningResult:
    """Land, ingest and clean ``images`` into ``storage``; returns what cleaning returned.

    Args:
        storage: the artifact storage receiving ``images/``, the raw manifest and the version.
        images, labels: one label (the landing folder name) per image.
        batch_id: the landing batch the images arrive in.
        config: cleaning settings.
        keep_all: require every image to come out ``clean``: tests that count samples rely on
            it, and a generator that makes duplicates should fail here, not in a count.

    Raises:
        ValueError: ``keep_all`` and cleaning removed or quarantined some image.
    """
    with tempfile.TemporaryDirectory(prefix="cvops-landing-") as tmp:
        write_landing_batch(Path(tmp), batch_id, images, labels)
        ingest_batch(LandingZone(tmp), storage, batch_id)
    # One decode worker: these datasets hold tens of tiny images, where more workers only
    # add start-up time (and the test machine runs several test processes at once).
    result = clean_dataset(storage, read_raw_manifests(storage, batch_ids=[batch_id]), config, workers=1)
    if keep_all and result.counts["clean"] != len(images):
        raise ValueError(f"cleaning kept {result.counts['clean']} of {len(images)} generated images: {result.counts}")
    return result


def shapes_dataset(
    storage: ArtifactStorage,
    n_classes: int = 3,
    per_class: int = 40,
    size: tuple[int, int] = (24, 24),
    mode: str = "L",
    seed: int = 0,
) -> CleaningResult:
    """A cleaned dataset of :func:`shape_images`; every image comes out clean (see :func:`clean_images`)."""
    images, labels = shape_images(n_classes, per_class, size, mode, seed)
    return clean_images(storage, images, labels)


def copy_storage(source: ArtifactStorage, target: ArtifactStorage) -> None:
    """Copy every key of ``source`` into ``target`` unchanged."""
    for key in source.list(""):
        src, dst = source.local_path(key), target.local_path(key)
        if src is not None and dst is not None:
            # A plain file copy: the storage's atomic write fsyncs every file, which costs
            # more than cleaning these small datasets again; a test's scratch copy needs none.
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        else:
            target.write_bytes(key, source.read_bytes(key))


class DatasetCache:
    """Cleans each distinct shapes dataset once and hands out copies of cleaning's files.

    Args:
        root: a folder for the cached storages (one per parameter set).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[object, ...], tuple[ArtifactStorage, CleaningResult]] = {}

    def shapes(
        self,
        storage: ArtifactStorage,
        n_classes: int = 3,
        per_class: int = 40,
        size: tuple[int, int] = (24, 24),
        mode: str = "L",
        seed: int = 0,
    ) -> CleaningResult:
        """:func:`shapes_dataset` into ``storage``, cleaned on first use, copied after that.

        ``storage`` gets its own copy of every file (raw images, raw manifest, canonical
        images, the version), so a test may write beside it or tamper with it freely.
        """
        key = (n_classes, per_class, tuple(size), mode, seed)
        if key not in self._built:
            cached = ArtifactStorage(str(self.root / f"shapes-{n_classes}x{per_class}-{size[0]}x{size[1]}-{mode}-{seed}"))
            self._built[key] = cached, shapes_dataset(cached, n_classes, per_class, size, mode, seed)
        cached, result = self._built[key]
        copy_storage(cached, storage)
        return result


def only_version(storage: ArtifactStorage) -> str:
    """The version of the one cleaned dataset in ``storage`` (fails if there are several)."""
    (version,) = {key.split("/")[1] for key in storage.list("datasets")}
    return version
