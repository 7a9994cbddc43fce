"""Canonical PNGs of the clean samples: content addressed, written only for kept images.

A raw file that already is a canonical PNG in the dataset mode (``passthrough``) is its own
canonical image: both are content addressed by the sha256 of the same bytes, so its raw key
``images/<sha256>.png`` is used as is. Any other clean image is stored as
``canonical/<sha256>.png``, from the first source at hand:

1. the pixels a worker sent back (small images), encoded here;
2. the PNG a worker wrote (larger images), or one a previous run published;
3. otherwise (facts from the decode cache for an image that was a duplicate before, say)
   the raw file is decoded again.

An image whose natural mode is not the dataset mode is converted (gray -> RGB is exact;
colour -> L uses Pillow's luma) and encoded from its source, unless a converted PNG made
before (``converted_sha``, from the decode cache) is in the storage.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvops_dagster.core.contracts import CANONICAL_PREFIX, IMAGES_PREFIX
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.imaging.decode import encode_png


@dataclass
class CanonicalSource:
    """What is known of one clean image's canonical form.

    Attributes:
        raw_key: the raw file's key.
        natural_mode: the image's own canonical mode ("L" or "RGB").
        passthrough: the raw file is a canonical PNG.
        sha: sha256 of a canonical PNG made for it (the raw file's for ``passthrough``).
        converted_sha: sha256 of its PNG converted to the other mode, if one was made.
        pixels: its canonical pixels when a worker sent them back.
    """

    raw_key: str
    natural_mode: str
    passthrough: bool
    sha: str | None
    converted_sha: str | None = None
    pixels: np.ndarray | None = None


@dataclass
class Published:
    """Canonical keys of the clean images, in the order given.

    Attributes:
        keys: the canonical PNG key of each image.
        converted: whether the image was converted to the dataset mode.
        natural_shas, converted_shas: the sha256 of each image's canonical PNG in its
            natural mode and converted to the other mode, where known (for the decode cache).
    """

    keys: list[str]
    converted: list[bool]
    natural_shas: list[str | None]
    converted_shas: list[str | None]


Redecode = Callable[[list[str]], dict[str, np.ndarray]]
"""Decodes raw keys again and returns their canonical pixels by key."""


def publish_canonical(
    storage: ArtifactStorage,
    sources: list[CanonicalSource],
    mode: str,
    out_dir: Path,
    redecode: Redecode,
    compress_level: int = 1,
) -> Published:
    """Give every clean image its canonical PNG in the dataset mode.

    Args:
        storage: the artifact storage receiving ``canonical/...``.
        sources: one per clean image.
        mode: the dataset mode.
        out_dir: where this run's workers wrote canonical PNGs (``canonical/`` itself on
            a local storage).
        redecode: decodes the raw files whose pixels and PNG are both unavailable.
        compress_level: zlib level of the PNGs encoded here.

    Returns:
        The key of each image, whether it was converted, and the sha256 of its natural-mode
        and converted PNGs where known.
    """
    natural = [s.sha for s in sources if s.sha and not s.passthrough]
    written = _available(storage, out_dir, natural + [s.converted_sha for s in sources if s.converted_sha])
    converted_known = [s.natural_mode != mode and s.converted_sha in written for s in sources]
    lacking = [
        s.raw_key
        for s, known in zip(sources, converted_known, strict=True)
        if not known and not s.passthrough and s.pixels is None and s.sha not in written
    ]
    again = redecode(sorted(set(lacking))) if lacking else {}
    published = Published([], [], [], [])
    for source, known in zip(sources, converted_known, strict=True):
        pixels = source.pixels if source.pixels is not None else again.get(source.raw_key)
        sha, converted_sha = source.sha, source.converted_sha
        if source.natural_mode == mode:
            if source.passthrough:
                key = _passthrough_key(storage, source)
            elif pixels is not None:
                sha, key = storage.write_content_addressed(CANONICAL_PREFIX, encode_png(pixels, compress_level), "png")
            else:
                key = _publish_written(storage, out_dir, str(sha))
        elif known:
            key = f"{CANONICAL_PREFIX}/{converted_sha}.png"
        else:
            image = _open_source(storage, source, pixels, out_dir)
            data = encode_png(image.convert(mode), compress_level)
            converted_sha, key = storage.write_content_addressed(CANONICAL_PREFIX, data, "png")
        published.keys.append(key)
        published.converted.append(source.natural_mode != mode)
        published.natural_shas.append(sha)
        published.converted_shas.append(converted_sha)
    return published


#: Above this many names, one listing of the folder is cheaper than a stat per name: a stat
#: from Python costs ~6 us, a listed entry ~1 us, and the folder holds the canonical PNGs of
#: the images cleaned here, rarely more than a few times the clean images of one dataset.
LIST_OVER = 2000


def _available(storage: ArtifactStorage, out_dir: Path, shas: list[str | None]) -> set[str]:
    """The shas whose canonical PNG exists, written by this run's workers or published before."""
    wanted = {sha for sha in shas if sha}
    if len(wanted) > LIST_OVER and out_dir.is_dir():
        with os.scandir(out_dir) as entries:
            found = wanted & {entry.name[: -len(".png")] for entry in entries if entry.name.endswith(".png")}
    else:
        found = {sha for sha in wanted if (out_dir / f"{sha}.png").exists()}
    rest = [sha for sha in shas if sha and sha not in found]
    if rest and not storage.is_local:  # one listing instead of a request per file
        stored = set(storage.list(CANONICAL_PREFIX))
        found |= {sha for sha in rest if f"{CANONICAL_PREFIX}/{sha}.png" in stored}
    return found


def _passthrough_key(storage: ArtifactStorage, source: CanonicalSource) -> str:
    """A canonical raw file's key: its own when it is ``images/<sha>.png``, else a copy's."""
    if source.raw_key == f"{IMAGES_PREFIX}/{source.sha}.png":
        return source.raw_key
    # Canonical bytes stored under another extension: the same bytes, named as a PNG.
    _, key = storage.write_content_addressed(CANONICAL_PREFIX, storage.read_bytes(source.raw_key), "png")
    return key


def _publish_written(storage: ArtifactStorage, out_dir: Path, sha: str) -> str:
    """The key of a PNG a worker wrote (uploaded from the scratch folder on a remote storage)."""
    key = f"{CANONICAL_PREFIX}/{sha}.png"
    if not storage.is_local and not storage.exists(key):
        storage.write_bytes(key, (out_dir / f"{sha}.png").read_bytes())
    return key


def _open_source(
    storage: ArtifactStorage, source: CanonicalSource, pixels: np.ndarray | None, out_dir: Path
) -> Image.Image:
    """The natural-mode canonical image of ``source``, from whichever form is at hand."""
    if pixels is not None:
        return Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    if source.passthrough:
        data = storage.read_bytes(source.raw_key)
    else:
        staged = out_dir / f"{source.sha}.png"
        data = staged.read_bytes() if staged.exists() else storage.read_bytes(f"{CANONICAL_PREFIX}/{source.sha}.png")
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        image.load()
        return image.copy()
