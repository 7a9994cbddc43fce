"""Names every stage agrees on: split names, record outcomes, storage prefixes and key builders.

One definition each (docs/contracts.md describes the files behind the keys). A stage that needs
one of these imports it from here rather than spelling the string again.
"""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Dataset splits, in the order they are reported."""

OUTCOMES: tuple[str, ...] = ("clean", "duplicate", "quarantined")
"""What cleaning makes of every input record: each ends in exactly one of these."""

IMAGES_PREFIX = "images"
"""Content-addressed raw image bytes: ``images/<sha256>.<ext>``."""

CANONICAL_PREFIX = "canonical"
"""Content-addressed canonical PNGs made by cleaning: ``canonical/<sha256>.png``."""

DATASETS_PREFIX = "datasets"
"""Cleaned dataset versions: ``datasets/<version>/manifest.parquet`` + ``dataset.json``."""


def dataset_keys(version: str) -> tuple[str, str]:
    """(manifest key, dataset.json key) of a cleaned dataset version."""
    return f"{DATASETS_PREFIX}/{version}/manifest.parquet", f"{DATASETS_PREFIX}/{version}/dataset.json"
