"""Sample thumbnails of a cleaned dataset: a small PNG grid, one row per class or quarantine reason.

They show a user what the data looks like, so they are bounded and cheap: a few samples per
group, a bounded number of groups, sources small enough to decode quickly, cells a few dozen
pixels wide, a palette PNG of a few kilobytes.

- Classes: clean samples, read from the dataset's canonical PNGs (what training sees).
- Quarantine reasons: only records whose file decoded during cleaning (the manifest has its
  canonical size; a label conflict, say). Their raw file is decoded again here with the
  cleaning decoder (:func:`cvops_dagster.imaging.decode.decode_image`: allow-listed formats,
  pixel limit, bomb warnings as errors) under a far smaller pixel limit. A file that did not
  decode gets no thumbnail; it is listed with its reason in the quarantine table instead.

Samples are picked by ``sample_id`` (a content hash), so the choice is stable between runs
and spread over the data rather than the first files of the first batch.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.imaging.decode import decode_image
from cvops_dagster.imaging.policy import DecodeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThumbnailConfig:
    """Bounds of a thumbnail grid.

    Attributes:
        per_group: samples shown per class or reason.
        max_groups: rows of the grid (the groups with most records come first when cut).
        cell: side of one thumbnail cell, in pixels.
        max_source_pixels: larger sources (width x height in the manifest) are not decoded.
        max_source_bytes: larger files are not read.
        colors: palette size of the PNG.
    """

    per_group: int = 4
    max_groups: int = 12
    cell: int = 32
    max_source_pixels: int = 2048 * 2048
    max_source_bytes: int = 8 * 1024 * 1024
    colors: int = 64


@dataclass
class ThumbnailGrid:
    """A PNG grid and what it shows.

    Attributes:
        png: the image.
        noun: what a row is, singular (``class``, ``quarantine reason``).
        groups: the class or reason of each row, in order.
        groups_total: groups with a sample that could be shown (more than ``len(groups)`` when
            cut at ``max_groups``).
        images: thumbnails drawn.
        skipped: ``record_id`` of picked samples that could not be shown.
        note: said after the figures (what the grid leaves out on purpose).
    """

    png: bytes
    noun: str
    groups: list[str]
    groups_total: int
    images: int
    skipped: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def caption(self) -> str:
        """One line for the UI under the image."""
        total = _plural(self.groups_total, self.noun)
        shown = f"{len(self.groups)} of {total}" if self.groups_total > len(self.groups) else total
        parts = [f"{_plural(self.images, 'sample')} of {shown}"]
        parts += [f"{len(self.skipped)} could not be shown"] if self.skipped else []
        parts += [self.note] if self.note else []
        return "; ".join(parts) + "."


def pick_samples(rows: pd.DataFrame, group_column: str, per_group: int, max_groups: int) -> dict[str, pd.DataFrame]:
    """Up to ``per_group`` rows per value of ``group_column``, for the ``max_groups`` largest groups.

    Rows are ordered by ``sample_id`` within a group (stable, spread over batches), one per
    distinct ``sample_id``; the largest groups are kept, shown in name order (labels read
    0, 1, 2, ... as a user expects).
    """
    if rows.empty:
        return {}
    groups = _group_names(rows[group_column])
    sizes = groups.value_counts()
    order = sorted(sorted(sizes.index, key=lambda g: (-int(sizes[g]), g))[:max_groups])
    ordered = rows.assign(_group=groups.to_numpy()).sort_values(["sample_id", "record_id"], na_position="last", kind="stable")
    # One thumbnail per file: the copies of a label conflict share their sample_id.
    distinct = ordered[~ordered.duplicated(["_group", "sample_id"]) | ordered["sample_id"].isna()]
    return {g: distinct[distinct["_group"] == g].head(per_group).drop(columns="_group") for g in order}


def _group_names(values: pd.Series) -> pd.Series:
    return values.astype(object).where(values.notna(), "(none)").map(str)


def class_thumbnails(storage: ArtifactStorage, manifest: pd.DataFrame, config: ThumbnailConfig = ThumbnailConfig()) -> ThumbnailGrid | None:
    """A grid of clean samples per class, from the canonical PNGs; ``None`` without clean rows."""
    clean = manifest[(manifest["outcome"] == "clean") & manifest["image_key"].notna()]
    return _grid(storage, clean, "label", "class", "image_key", config)


def quarantine_thumbnails(
    storage: ArtifactStorage,
    manifest: pd.DataFrame,
    decode: DecodeConfig = DecodeConfig(),
    config: ThumbnailConfig = ThumbnailConfig(),
) -> ThumbnailGrid | None:
    """A grid of quarantined samples per reason, of the files that decoded during cleaning;
    ``None`` when none did."""
    quarantined = manifest[manifest["outcome"] == "quarantined"]
    decoded = quarantined[quarantined["width"].notna() & quarantined["raw_image_key"].notna()]
    limits = replace(decode, max_pixels=min(decode.max_pixels, config.max_source_pixels))
    grid = _grid(storage, decoded, "reason", "quarantine reason", "raw_image_key", config, limits)
    if grid is not None:
        grid.note = "files that did not decode have no thumbnail (see quarantine_examples)"
    return grid


def _grid(
    storage: ArtifactStorage,
    rows: pd.DataFrame,
    group_column: str,
    noun: str,
    key_column: str,
    config: ThumbnailConfig,
    decode: DecodeConfig | None = None,
) -> ThumbnailGrid | None:
    small = rows[_fits(rows, config)]
    picked = pick_samples(small, group_column, config.per_group, config.max_groups)
    groups_total = int(_group_names(small[group_column]).nunique())
    if not picked:
        return None
    samples = pd.concat(picked.values())
    datas = storage.read_many(samples[key_column].tolist())  # one batched fetch on S3
    by_record = dict(zip(samples["record_id"], datas, strict=True))
    limits = decode or DecodeConfig(max_pixels=config.max_source_pixels)
    cells: list[tuple[str, list[Image.Image]]] = []
    skipped: list[str] = []
    for group, group_rows in picked.items():
        images = []
        for record_id in group_rows["record_id"]:
            image = _thumbnail(by_record[record_id], limits, config.cell)
            if image is None:
                skipped.append(str(record_id))
            else:
                images.append(image)
        cells.append((group, images))
    drawn = sum(len(images) for _, images in cells)
    return ThumbnailGrid(grid_png(cells, config), noun, [g for g, _ in cells], max(groups_total, len(cells)), drawn, skipped)


def _fits(rows: pd.DataFrame, config: ThumbnailConfig) -> pd.Series:
    """Rows whose image is small enough to decode for a thumbnail (unknown sizes are not)."""
    pixels = rows["width"].astype("Float64") * rows["height"].astype("Float64")
    size = rows["file_size"].astype("Float64").fillna(0)
    return (pixels.fillna(float("inf")) <= config.max_source_pixels) & (size <= config.max_source_bytes)


def _thumbnail(data: bytes, limits: DecodeConfig, cell: int) -> Image.Image | None:
    """The image in ``data`` scaled into a ``cell`` square, or ``None`` when it does not decode."""
    try:
        image = decode_image(data, limits).image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - a sample that does not decode is only not shown
        logger.debug("thumbnail: sample not shown (%s: %s)", type(exc).__name__, exc)
        return None
    image.thumbnail((cell, cell), Image.Resampling.BILINEAR)
    return image


def grid_png(rows: list[tuple[str, list[Image.Image]]], config: ThumbnailConfig = ThumbnailConfig()) -> bytes:
    """One row per group: its name, then its thumbnails centred in ``config.cell`` squares."""
    font: Any = ImageFont.load_default()
    label_width = 80
    pad = 2
    width = label_width + config.per_group * (config.cell + pad) + pad
    height = max(1, len(rows)) * (config.cell + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows):
        top = pad + r * (config.cell + pad)
        draw.text((pad, top + config.cell // 2 - 6), _short(name, 14), fill=(0, 0, 0), font=font)
        for c, image in enumerate(images[: config.per_group]):
            left = label_width + pad + c * (config.cell + pad)
            grid.paste(image, (left + (config.cell - image.width) // 2, top + (config.cell - image.height) // 2))
    buffer = io.BytesIO()
    grid.quantize(colors=config.colors).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def _short(text: str, limit: int) -> str:
    """``text`` in ASCII (any font draws it; a label may be any Unicode) cut to ``limit``."""
    plain = text.encode("ascii", "replace").decode("ascii")
    return plain if len(plain) <= limit else plain[: limit - 2] + ".."
