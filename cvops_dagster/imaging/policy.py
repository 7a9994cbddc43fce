"""What decoding accepts and promises: limits, the normalisation policy and its version, reasons.

Every untrusted file either becomes one canonical 8-bit image ("L" or "RGB") under the
recorded :data:`NORMALISATION_POLICY`, or is refused with a stable reason code (the values
of the cleaned manifest's ``reason`` column for quarantined rows). :class:`DecodeConfig`
holds the limits. :func:`policy_key` names one policy: the version, the policy text, the
settings that change results and the Pillow release; facts decoded under one key are
valid for exactly that key (the decode cache is keyed by it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import PIL

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
"""Formats accepted, by Pillow format name. MPO (multi-picture JPEG) counts as JPEG."""

NORMALISATION_POLICY_VERSION = 1
"""Bump on any change to what decoding or normalisation makes of a file (a new rule, a
changed default, a new fact computed per file): cached decode facts of an older version are
then ignored and every file is decoded again."""

NORMALISATION_POLICY: dict[str, str] = {
    "orientation": "EXIF orientation applied with ImageOps.exif_transpose",
    "animation": "first_frame",
    "alpha": "composited on the fixed background colour",
    "high_bit_depth": "integers scaled by bit shift to 8 bits (16-bit: >> 8), floats min-max scaled",
    "palette_cmyk_ycbcr": "converted to RGB",
    "grayscale": "RGB whose channels differ by at most gray_tolerance is grayscale (L)",
    "encoding": "PNG, 8-bit, L or RGB",
}
"""What normalisation does, recorded in dataset.json."""

# Reason codes (also the values of the manifest's `reason` column for quarantined rows).
REASON_EMPTY = "empty_file"
REASON_FORMAT = "format_not_allowed"
REASON_CHECKSUM = "bad_checksum"
REASON_TRUNCATED = "truncated"
REASON_BOMB = "decompression_bomb"
REASON_MEMORY = "out_of_memory"
REASON_MODE = "unsupported_mode"
REASON_DECODE = "decode_error"
REASON_TIMEOUT = "decode_timeout"
REASON_CRASH = "decoder_crashed"
REASON_MISSING = "missing_image"
REASON_UNREADABLE = "unreadable"

TRANSIENT_REASONS: frozenset[str] = frozenset(
    {REASON_TIMEOUT, REASON_CRASH, REASON_MEMORY, REASON_MISSING, REASON_UNREADABLE}
)
"""Failures that depend on the run, not only on the file's bytes and the policy: a loaded
machine (timeouts), a worker killed from outside (crashes), the worker's size at start (the
address-space limit is relative to it), or the storage (missing, unreadable). They are never
cached as final; the next run tries those files again."""


class DecodeFailure(Exception):
    """A file that cannot become a canonical image; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in decode workers and re-raised in the parent: keep reason and detail apart.
        return (DecodeFailure, (self.reason, self.detail))


@dataclass(frozen=True)
class DecodeConfig:
    """Limits and normalisation settings for decoding.

    Attributes:
        max_pixels: largest width x height accepted (Pillow's default warns at ~89.5M);
            above it the file is a ``decompression_bomb``.
        allowed_formats: Pillow format names accepted.
        background: RGB colour alpha is composited on.
        gray_tolerance: largest channel difference for which an RGB image counts as gray.
        png_compress_level: zlib level of canonical PNGs. 1, not zlib's usual 6: on photos
            level 6 took ~52 ms of the ~60 ms a file costs (decoding is ~3 ms), level 1 ~12 ms
            for files ~10% larger; canonical PNGs are written once per clean image.
        task_timeout_s: decode time limit of one file in a worker; a chunk of files gets
            the same limit as a whole (see :mod:`cvops_dagster.imaging.sandbox`).
        memory_limit_bytes: address space a worker may add on top of its size at start.
        silence_stderr: send worker stderr (C decoder warnings) to /dev/null.
        start_method: multiprocessing start method of the workers (see
            :mod:`cvops_dagster.imaging.sandbox` for why "fork" is the default).
        chunk_size: files per worker task; ``None`` picks from the file count.
    """

    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS
    background: tuple[int, int, int] = (255, 255, 255)
    gray_tolerance: int = 2
    png_compress_level: int = 1
    task_timeout_s: float = 30.0
    memory_limit_bytes: int = 2 * 1024**3
    silence_stderr: bool = True
    start_method: str = "fork"
    chunk_size: int | None = None


# The settings that change what a file decodes to (or whether it is refused). Timeouts, the
# memory limit and the pool's shape only change transient outcomes, which are never cached.
_RESULT_FIELDS = ("max_pixels", "allowed_formats", "background", "gray_tolerance", "png_compress_level")


def policy_key(config: DecodeConfig = DecodeConfig()) -> str:
    """A short name for the policy ``config`` decodes under (16 hex digits).

    It covers :data:`NORMALISATION_POLICY_VERSION`, the policy text, the settings of
    ``config`` that change results, and the Pillow release (a new Pillow may decode a file
    differently); equal keys mean equal per-file decode facts.
    """
    described = {
        "version": NORMALISATION_POLICY_VERSION,
        "policy": NORMALISATION_POLICY,
        "config": {name: getattr(config, name) for name in _RESULT_FIELDS},
        "pillow": PIL.__version__,
    }
    text = json.dumps(described, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
