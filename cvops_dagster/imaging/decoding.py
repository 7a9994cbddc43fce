"""Safe image decoding and normalisation, in isolated worker processes.

Every input file is untrusted. :func:`decode_image` turns its bytes into one canonical 8-bit
image, or raises :class:`DecodeFailure` with a short reason code:

- the format is detected from magic bytes, never from the extension, and must be in the
  allow-list (PNG, JPEG, WebP, BMP, TIFF, GIF); Pillow is then told to use only that plugin;
- PNG chunk checksums are verified (Pillow skips the CRC of image-data chunks on ``load``);
  a PNG that is already canonical (8-bit L/RGB, only IHDR/IDAT/IEND, not interlaced) skips
  the Python PNG plugin: its image data goes straight to Pillow's C inflate-and-unfilter
  decoder, which is most of what a large dataset of small PNGs costs;
- the declared size is checked against a pixel limit far below Pillow's default before any
  pixel is decoded, and Pillow's own bomb warning is an error;
- the whole image is decoded with ``load()`` (``verify()`` checks far less), and
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set, so a truncated file fails;
- every decoder exception is caught and classified.

Normalisation (the recorded policy, see :data:`NORMALISATION_POLICY`): EXIF orientation is
applied; palette, CMYK, YCbCr and other modes become RGB; alpha (RGBA, LA, palette with
transparency) is composited on a fixed background; 16-bit and 32-bit integer images are
scaled by bit shift (a 16-bit ramp keeps 256 levels, nothing is clipped); float images are
scaled to their range; animated images keep their first frame. An RGB image whose channels
agree within a tolerance is grayscale ("L"), otherwise it stays "RGB" ("natural mode"); the
dataset's single mode is chosen later from these (see ``cleaning``).

:func:`decode_pool` runs the work in a pool of worker processes, each with an address-space
limit (``RLIMIT_AS``), stderr sent to /dev/null (libjpeg and libtiff warnings would flood
the run log), and a per-file timeout. A worker that hangs is killed and the file is
quarantined as ``decode_timeout``; a worker that dies takes only its current file with it
(``decoder_crashed``); the other files of its chunk are retried on a fresh worker.
Work is sent in chunks and results come back per chunk, so there is no per-file process
round trip. Files are decoded grouped by format (one decoder's code stays hot), workers keep
the memory they free instead of page-faulting it in again for every chunk, and a chunk's
kept pixels travel as one packed array.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import multiprocessing
import os
import signal
import struct
import tempfile
import threading
import time
import uuid
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cvops_dagster.imaging.hashes import THUMB_SIZE, perceptual_hashes, pixel_hash
from cvops_dagster.imaging.features import FEATURE_COLUMNS, pixel_features

logger = logging.getLogger(__name__)

# Load every Pillow plugin now, so forked (or forkserver-preloaded) workers start with them
# imported instead of importing them on their first file.
Image.init()

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
"""Formats accepted, by Pillow format name. MPO (multi-picture JPEG) counts as JPEG."""

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

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ORIENTATION_TAG = 0x0112
_HIGH_BIT_MODES = {"I;16": 8, "I;16L": 8, "I;16B": 8, "I;16N": 8, "I;16S": 8}


class DecodeFailure(Exception):
    """A file that cannot become a canonical image; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeConfig:
    """Limits and normalisation settings for decoding.

    Attributes:
        max_pixels: largest width x height accepted (Pillow's default warns at ~89.5M);
            above it the file is a ``decompression_bomb``.
        allowed_formats: Pillow format names accepted.
        background: RGB colour alpha is composited on.
        gray_tolerance: largest channel difference for which an RGB image counts as gray.
        png_compress_level: zlib level of canonical PNGs.
        task_timeout_s: per-file decode time limit in a worker.
        memory_limit_bytes: address space a worker may add on top of its size at start.
        silence_stderr: send worker stderr (C decoder warnings) to /dev/null.
        start_method: multiprocessing start method for workers. "fork" (default) starts a
            worker in ~10 ms with everything already imported; "forkserver" and "spawn"
            re-import the parent's main module in every worker (in a Dagster run process
            that is Dagster itself, seconds per worker). A worker that hangs at start (the
            risk of forking a threaded parent) is killed by the start-up watchdog.
        chunk_size: files per worker task; ``None`` picks from the file count.
    """

    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS
    background: tuple[int, int, int] = (255, 255, 255)
    gray_tolerance: int = 2
    png_compress_level: int = 6
    task_timeout_s: float = 30.0
    memory_limit_bytes: int = 2 * 1024**3
    silence_stderr: bool = True
    start_method: str = "fork"
    chunk_size: int | None = None


@dataclass
class DecodedImage:
    """A decoded, normalised image and what was learnt about its source.

    The canonical pixels are kept as a uint8 array, the form hashing, features and
    training consume; :attr:`image` wraps them as a Pillow image when one is needed.

    Attributes:
        pixels: canonical pixels, (H, W) for "L" or (H, W, 3) for "RGB", C-contiguous.
        format: source format (Pillow name), ``mode``/``width``/``height`` the source's.
        animated: the source had more than one frame (only the first is kept).
        orientation: the EXIF orientation applied (1 when none).
        passthrough: the source bytes already are the canonical PNG.
    """

    pixels: np.ndarray
    format: str
    mode: str
    width: int
    height: int
    animated: bool
    orientation: int
    passthrough: bool = False

    @property
    def canonical_mode(self) -> str:
        """ "L" or "RGB"."""
        return "L" if self.pixels.ndim == 2 else "RGB"

    @property
    def is_color(self) -> bool:
        """The image is colour ("RGB" natural mode)."""
        return self.pixels.ndim == 3

    @property
    def image(self) -> Image.Image:
        """The canonical image as a Pillow image (mode :attr:`canonical_mode`)."""
        return Image.fromarray(self.pixels, mode=self.canonical_mode)


def _canonical_array(image: Image.Image) -> np.ndarray:
    """The pixels of an "L" or "RGB" image as a C-contiguous uint8 array (one copy)."""
    width, height = image.size
    shape = (height, width) if image.mode == "L" else (height, width, 3)
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(shape)


# ---------------------------------------------------------------------------- detection


def sniff_format(head: bytes) -> str | None:
    """The allow-listed format whose magic bytes start ``head``, else ``None``.

    Args:
        head: the first bytes of a file (16 are enough).

    Returns:
        Pillow's format name (``PNG``, ``JPEG``, ``GIF``, ``BMP``, ``TIFF``, ``WEBP``) or
        ``None`` for anything else, whatever its extension.
    """
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_png_chunks(data: bytes) -> bool:
    """Verify every PNG chunk's length and CRC up to IEND.

    Returns:
        ``True`` when the file holds only the critical chunks (IHDR, IDAT, IEND), meaning a
        plain 8-bit PNG can be used as its own canonical form.

    Raises:
        DecodeFailure: ``truncated`` when a chunk or IEND is missing, ``bad_checksum`` on a
            CRC mismatch.
    """
    return _walk_png(data)[0]


def _walk_png(data: bytes) -> tuple[bool, list[memoryview]]:
    """:func:`check_png_chunks`, also returning the IDAT payloads in file order."""
    view = memoryview(data)
    pos = len(_PNG_MAGIC)
    end = len(data)
    only_critical = True
    idat: list[memoryview] = []
    unpack = _UINT32.unpack_from
    crc32 = zlib.crc32
    while True:
        if pos + 8 > end:
            raise DecodeFailure(REASON_TRUNCATED, "PNG ends before IEND")
        (length,) = unpack(data, pos)
        chunk_type = data[pos + 4 : pos + 8]
        stop = pos + 12 + length
        if stop > end:
            raise DecodeFailure(REASON_TRUNCATED, f"PNG chunk {chunk_type!r} is cut short")
        (stored,) = unpack(data, stop - 4)
        if crc32(view[pos + 4 : stop - 4]) != stored:
            raise DecodeFailure(REASON_CHECKSUM, f"PNG chunk {chunk_type!r} fails its CRC")
        if chunk_type == b"IDAT":
            idat.append(view[pos + 8 : stop - 4])
        elif chunk_type == b"IEND":
            return only_critical, idat
        elif chunk_type != b"IHDR":
            only_critical = False
        pos = stop


_UINT32 = struct.Struct(">I")
_IHDR = struct.Struct(">4sIIBBBBB")  # chunk type, width, height, depth, colour, compression, filter, interlace


def _decode_plain_png(data: bytes, idat: list[memoryview], config: DecodeConfig) -> DecodedImage | None:
    """Decode a PNG holding only IHDR/IDAT/IEND, 8-bit gray or RGB, not interlaced.

    Such a file is already in canonical form, so Pillow's PNG plugin (chunk parsing in
    Python, ancillary chunks, palettes, EXIF) has nothing to add: the IDAT stream goes
    straight to Pillow's own C "zip" decoder (inflate + PNG row filters), the one the
    plugin itself uses. CRCs were checked by :func:`_walk_png`. Returns ``None`` for any
    other PNG, which takes the general path.
    """
    if len(data) < 33 or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    tag, width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack_from(data, 12)
    if tag != b"IHDR" or depth != 8 or colour not in (0, 2) or compression or filtering or interlace:
        return None
    if width <= 0 or height <= 0:
        raise DecodeFailure(REASON_DECODE, f"image has size {width}x{height}")
    if width * height > config.max_pixels:
        raise DecodeFailure(REASON_BOMB, f"{width}x{height} exceeds {config.max_pixels} pixels")
    mode = "L" if colour == 0 else "RGB"
    stream = bytes(idat[0]) if len(idat) == 1 else b"".join(idat)
    pixels = _inflate_png(stream, mode, width, height)
    passthrough = True
    if mode == "RGB":
        gray = _gray_channel(pixels.tobytes(), config.gray_tolerance)
        if gray is not None:
            passthrough = False
            if not gray:  # channels differ within the tolerance: Pillow's luma
                gray = Image.fromarray(pixels, mode="RGB").convert("L").tobytes()
            pixels = np.frombuffer(gray, dtype=np.uint8).reshape(height, width)
    return DecodedImage(
        pixels=pixels,
        format="PNG",
        mode=mode,
        width=width,
        height=height,
        animated=False,
        orientation=1,
        passthrough=passthrough,
    )


def _inflate_png(stream: bytes, mode: str, width: int, height: int) -> np.ndarray:
    """Inflate and unfilter 8-bit, non-interlaced PNG image data straight into an array.

    Pillow's "zip" decoder writes into a Pillow image mapped onto the array's memory
    (``RGB`` is held as ``RGBX``, Pillow's layout), so there is no image object and no
    copy out of one.
    """
    if mode == "L":
        buffer = np.empty((height, width), dtype=np.uint8)
        target = "L"
    else:
        buffer = np.empty((height, width, 4), dtype=np.uint8)
        target = "RGBX"
    mapped = Image.core.map_buffer(buffer, (width, height), "raw", 0, (target, 0, 1))
    decoder = Image.core.zip_decoder(target, mode)
    decoder.setimage(mapped, (0, 0, width, height))
    consumed, error = decoder.decode(stream)
    if consumed >= 0:
        raise DecodeFailure(REASON_TRUNCATED, "PNG image data ends early")
    if error != 0:
        raise DecodeFailure(REASON_DECODE, f"PNG image data cannot be decoded (error {error})")
    return buffer if mode == "L" else np.ascontiguousarray(buffer[..., :3])


# ---------------------------------------------------------------------------- normalisation


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode == "La":
        # Pillow cannot convert premultiplied "La"; composite it directly: out = L + (1 - a) * bg.
        pixels = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, 2)
        gray = pixels[..., 0] + (255.0 - pixels[..., 1]) * (sum(background) / 3.0) / 255.0
        return Image.fromarray(np.clip(gray.round(), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _scale_high_bit(image: Image.Image) -> Image.Image:
    """8-bit "L" from 16/32-bit integer or float grayscale, scaled rather than clipped."""
    array = np.asarray(image)
    if image.mode in _HIGH_BIT_MODES:
        scaled = (array.astype(np.uint32) >> _HIGH_BIT_MODES[image.mode]).astype(np.uint8)
    elif image.mode == "I":
        values = array.astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low >= 0 and high <= 255:
            scaled = values.astype(np.uint8)
        elif low >= 0 and high <= 65535:  # 16-bit data held in a 32-bit mode
            scaled = (values >> 8).astype(np.uint8)
        else:
            scaled = ((values - low) * 255 // max(high - low, 1)).astype(np.uint8)
    else:  # "F"
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        scaled = np.rint((values - low) * 255.0 / max(high - low, 1e-12)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L") if scaled.ndim == 2 else Image.fromarray(scaled)


def normalise_mode(image: Image.Image, config: DecodeConfig = DecodeConfig()) -> Image.Image:
    """Convert a decoded image to its natural canonical mode, "L" or "RGB".

    Raises:
        DecodeFailure: ``unsupported_mode`` when Pillow cannot convert the mode.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        result = image
    elif mode == "1":
        result = image.convert("L")
    elif mode in _HIGH_BIT_MODES or mode in ("I", "F"):
        result = _scale_high_bit(image)
    elif mode == "P":
        palette = image.palette
        has_alpha = "transparency" in image.info or palette is not None and palette.mode == "RGBA"
        if has_alpha:
            result = _composite(image, config.background)
        elif palette is not None and palette.mode == "RGB" and _is_gray_palette(palette.tobytes()):
            result = image.convert("L")  # exact: every entry has R = G = B
        else:
            result = image.convert("RGB")
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        result = _composite(image, config.background)
    else:  # CMYK, YCbCr, HSV, LAB, RGBX...
        try:
            result = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise DecodeFailure(REASON_MODE, f"cannot convert mode {mode}: {exc}") from exc
    if result.mode == "RGB" and result.width and result.height:
        gray = _gray_channel(result.tobytes(), config.gray_tolerance)
        if gray is not None:
            result = Image.frombytes("L", result.size, gray) if gray else result.convert("L")
    return result


def _is_gray_palette(raw: bytes) -> bool:
    """Whether every entry of a packed RGB palette is an exact gray (R = G = B).

    Then the palette image converts to "L" directly, as it would through RGB and the
    grayscale rule, without the RGB copy.
    """
    return len(raw) % 3 == 0 and raw[0::3] == raw[1::3] == raw[2::3]


def _gray_channel(raw: bytes, tolerance: int) -> bytes | None:
    """Whether packed RGB bytes are grayscale within ``tolerance``.

    Returns:
        The red channel when all three channels are equal (then it *is* Pillow's "L"
        conversion: the luma weights sum to one), ``b""`` when they differ but only within
        the tolerance (convert with Pillow), ``None`` for a colour image.

    Strided byte slices and element-wise numpy work on the three planes; a reduction over
    the last axis of an (H, W, 3) array costs ten times more on small images.
    """
    red = raw[0::3]
    if red == raw[1::3] == raw[2::3]:
        return red
    if tolerance <= 0:
        return None
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).T
    r, g, b = planes[0], planes[1], planes[2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return b"" if int(spread.max()) <= tolerance else None


def _classify(exc: BaseException) -> tuple[str, str]:
    """Map a decoder exception to (reason, detail)."""
    detail = f"{type(exc).__name__}: {exc}"[:300]
    message = str(exc).lower()
    if isinstance(exc, DecodeFailure):
        return exc.reason, exc.detail
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return REASON_BOMB, detail
    if isinstance(exc, MemoryError):
        return REASON_MEMORY, detail
    if "truncated" in message or isinstance(exc, EOFError):
        return REASON_TRUNCATED, detail
    if "crc" in message:
        return REASON_CHECKSUM, detail
    return REASON_DECODE, detail


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig()) -> DecodedImage:
    """Decode untrusted bytes into a canonical image.

    Safe to call in any process: the pixel limit is checked here, not through Pillow's
    global, and warnings are only changed inside this call. Isolation from hangs, crashes
    and memory exhaustion comes from running it in :func:`decode_pool`'s workers.

    Args:
        data: the file's bytes.
        config: limits and normalisation settings.

    Returns:
        The decoded image and its source facts.

    Raises:
        DecodeFailure: with a reason code for every kind of bad input.
    """
    if not data:
        raise DecodeFailure(REASON_EMPTY, "file has no bytes")
    fmt = sniff_format(data[:16])
    if fmt is None or fmt not in config.allowed_formats:
        raise DecodeFailure(REASON_FORMAT, f"magic bytes {data[:8].hex()} are not an allowed format")
    try:
        if _IN_WORKER:  # warnings were set once for the whole process
            return _decode_checked(data, fmt, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode_checked(data, fmt, config)
    except DecodeFailure:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        struct.error,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        MemoryError,
        NotImplementedError,
        IndexError,
        KeyError,
        TypeError,
        ZeroDivisionError,
        OverflowError,
        AttributeError,
        RuntimeError,
        AssertionError,
        ArithmeticError,
        LookupError,
    ) as exc:
        reason, detail = _classify(exc)
        raise DecodeFailure(reason, detail) from exc


def _decode_checked(data: bytes, fmt: str, config: DecodeConfig) -> DecodedImage:
    plain_png = False
    if fmt == "PNG":
        plain_png, idat = _walk_png(data)
        if plain_png:
            fast = _decode_plain_png(data, idat, config)
            if fast is not None:
                return fast
    # formats=[...]: only the sniffed plugin may claim the file.
    image = Image.open(io.BytesIO(data), formats=[fmt])
    if image.format not in config.allowed_formats and not (image.format == "MPO" and "JPEG" in config.allowed_formats):
        raise DecodeFailure(REASON_FORMAT, f"decoder reports {image.format}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeFailure(REASON_DECODE, f"image has size {width}x{height}")
    if width * height > config.max_pixels:
        raise DecodeFailure(REASON_BOMB, f"{width}x{height} exceeds {config.max_pixels} pixels")
    try:
        animated = bool(getattr(image, "is_animated", False))
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError):
        animated = True  # a later frame is unreadable; the policy keeps only the first
    if animated:
        image.seek(0)
    source_mode = image.mode
    image.load()
    orientation = 1
    info = image.info
    # getexif() parses EXIF (and XMP) on every call; only images carrying either can have
    # an orientation, and a TIFF holds it as a plain tag.
    if (
        "exif" in info
        or "Raw profile type exif" in info
        or "xmp" in info
        or "XML:com.adobe.xmp" in info
        or (fmt == "TIFF" and _ORIENTATION_TAG in getattr(image, "tag_v2", {}))
    ):
        try:
            orientation = int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
        except (OSError, ValueError, SyntaxError, struct.error, TypeError, KeyError, IndexError):
            orientation = 1  # unreadable EXIF: keep the stored orientation
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
        else:
            orientation = 1
    canonical = normalise_mode(image, config)
    passthrough = (
        plain_png
        and orientation == 1
        and not animated
        and canonical is image
        and data[24] == 8  # bit depth
        and data[25] in (0, 2)  # colour type: gray or RGB, no alpha
        and data[28] == 0  # not interlaced
    )
    return DecodedImage(
        pixels=_canonical_array(canonical),
        format="JPEG" if image.format == "MPO" else str(image.format or fmt),
        mode=source_mode,
        width=width,
        height=height,
        animated=animated,
        orientation=orientation,
        passthrough=passthrough,
    )


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
    """The canonical PNG bytes of an "L" or "RGB" image (no metadata chunks)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- chunk work

RESULT_COLUMNS: tuple[str, ...] = (
    "key",
    "ok",
    "reason",
    "reason_detail",
    "format",
    "mode",
    "orig_width",
    "orig_height",
    "animated",
    "orientation",
    "canonical_mode",
    "canonical_sha",
    "pixel_hash",
    "passthrough",
)
"""Per-file columns of :func:`decode_pool`'s output, besides features and hashes."""
_ALL_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys((*RESULT_COLUMNS, *FEATURE_COLUMNS)))
# Chunk results carry these as numpy arrays (compact to pickle), the rest as lists.
_INT_COLUMNS: tuple[str, ...] = ("orig_width", "orig_height", "orientation", "width", "height", "channels", "file_size")
_FLOAT_COLUMNS: tuple[str, ...] = ("aspect_ratio", "brightness", "contrast", "sharpness")
_BOOL_COLUMNS: tuple[str, ...] = ("ok", "animated", "passthrough")
_OBJECT_COLUMNS: tuple[str, ...] = tuple(
    c for c in _ALL_COLUMNS if c not in (*_INT_COLUMNS, *_FLOAT_COLUMNS, *_BOOL_COLUMNS)
)


def _write_canonical(out_dir: Path, data: bytes, source: str | None = None) -> str:
    """Write canonical PNG bytes content-addressed into ``out_dir``; return the sha256.

    ``source`` is a file holding exactly ``data``: it is hard-linked when possible, which
    costs one system call instead of a write.
    """
    sha = hashlib.sha256(data).hexdigest()
    target = out_dir / f"{sha}.png"
    if source is not None:
        try:
            os.link(source, target)
            return sha
        except FileExistsError:
            return sha
        except OSError:
            pass  # another file system, or links not allowed: copy below
    if not target.exists():
        tmp = out_dir / f".tmp-{sha}.png-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return sha


# Canonical PNG sha256 per (folder, pixel hash) written by this process's encoder. The
# encoder is deterministic, so an exact duplicate met again (a lossless re-encode, a copy)
# needs neither encoding nor a file; the cache lives as long as one decode worker.
_ENCODED: dict[tuple[str, str], str] = {}
_ENCODED_MAX = 200_000


def _read_file(path: str) -> bytes:
    """The whole file, with plain system calls (a buffered file object costs more here).

    Read until ``read`` returns nothing: a short read (a network or FUSE file system, a
    signal) is not the end of the file. One read of up to 256 KB takes most files whole;
    the read that confirms the end costs ~0.3 us, less than an ``fstat``.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, _FIRST_READ)
            if not data:
                return data
            chunk = os.read(fd, _FIRST_READ)
            if not chunk:
                return data
            parts = [data, chunk]
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)
    except FileNotFoundError as exc:
        raise DecodeFailure(REASON_MISSING, str(exc)) from exc
    except OSError as exc:
        raise DecodeFailure(REASON_UNREADABLE, str(exc)) from exc


_FIRST_READ = 256 * 1024


# True in decode workers, whose warning filters are set once by _init_worker.
_IN_WORKER = False

# Indirection so tests can inject hangs and crashes (with the "fork" start method).
_ITEM_HOOK: Callable[[str], None] | None = None


def process_chunk(
    items: Sequence[tuple[str, str]],
    config: DecodeConfig,
    out_dir: str | os.PathLike[str],
    state: Any = None,
    keep_pixels_up_to: int = 0,
    write_passthrough: bool = True,
) -> dict[str, Any]:
    """Decode a chunk of files; the unit of work a worker does between two messages.

    Args:
        items: ``(key, local path)`` per file.
        config: decoding settings.
        out_dir: folder the canonical PNGs are written to as ``<sha256>.png``.
        state: optional shared array a worker reports progress in (for timeouts).
        keep_pixels_up_to: canonical images of at most this many bytes that are not
            already canonical PNGs are returned as arrays (``pixels``) instead of being
            encoded here, so a caller can encode only the ones it keeps.
        write_passthrough: also place files that already are canonical PNGs in
            ``out_dir``; when ``False`` only their sha256 is reported.

    Returns:
        Columns (lists) named :data:`RESULT_COLUMNS` and :data:`FEATURE_COLUMNS`, plus
        ``phash`` (uint64 array), ``compare`` (uint8 array (N, 16, 16)) and ``pixels``
        (the images kept as arrays, packed by :func:`_pack_pixels`).
    """
    out_path = Path(out_dir)
    out_text = str(out_dir)
    n = len(items)
    columns: dict[str, Any] = {name: [None] * n for name in _OBJECT_COLUMNS}
    columns["key"] = [key for key, _ in items]
    # One tuple per decoded file; the columns are built once after the loop (a numpy
    # element assignment per field and file cost several microseconds a file).
    decoded_rows: list[tuple[int, DecodedImage, str, str | None, int]] = []
    thumbs = np.zeros((n, THUMB_SIZE, THUMB_SIZE), dtype=np.uint8)
    pixels: dict[int, np.ndarray] = {}
    level = config.png_compress_level
    for index, (key, path) in enumerate(items):
        if state is not None:
            state[1] = index
            state[2] = time.monotonic()
        try:
            if _ITEM_HOOK is not None:
                _ITEM_HOOK(key)
            data = _read_file(path)
            decoded = decode_image(data, config)
            array = decoded.pixels
            digest = pixel_hash(array)
            if array.shape != (THUMB_SIZE, THUMB_SIZE):  # in the loop: this file's time and fault
                gray = Image.fromarray(array, mode="L") if array.ndim == 2 else decoded.image.convert("L")
                thumbs[index] = np.asarray(gray.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX))
            if decoded.passthrough:
                sha = _write_canonical(out_path, data, source=path) if write_passthrough else hashlib.sha256(data).hexdigest()
            elif array.nbytes <= keep_pixels_up_to:
                sha = None
                pixels[index] = array
            else:
                cache_key = (out_text, digest)
                sha = _ENCODED.get(cache_key)
                if sha is None or not os.path.exists(out_path / f"{sha}.png"):
                    sha = _write_canonical(out_path, encode_png(decoded.image, level))
                    if len(_ENCODED) < _ENCODED_MAX:
                        _ENCODED[cache_key] = sha
        except DecodeFailure as exc:
            columns["reason"][index], columns["reason_detail"][index] = exc.reason, exc.detail
            continue
        except MemoryError as exc:
            columns["reason"][index], columns["reason_detail"][index] = REASON_MEMORY, f"MemoryError: {exc}"[:300]
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder bug is a quarantine, not a crash
            columns["reason"][index], columns["reason_detail"][index] = _classify(exc)
            continue
        decoded_rows.append((index, decoded, digest, sha, len(data)))
    ok_rows = [row[0] for row in decoded_rows]
    images = [row[1] for row in decoded_rows]
    canonical = [d.pixels for d in images]
    for name, values in (
        ("format", [d.format for d in images]),
        ("mode", [d.mode for d in images]),
        ("canonical_mode", [d.canonical_mode for d in images]),
        ("canonical_sha", [row[3] for row in decoded_rows]),
        ("pixel_hash", [row[2] for row in decoded_rows]),
    ):
        column = columns[name]
        for index, value in zip(ok_rows, values, strict=True):
            column[index] = value
    ok_index = np.asarray(ok_rows, dtype=np.int64)
    ok_column = np.zeros(n, dtype=bool)
    ok_column[ok_index] = True

    def scatter(values: list[Any], dtype: Any, fill: Any = 0) -> np.ndarray:
        full = np.full(n, fill, dtype=dtype)
        full[ok_index] = values
        return full

    file_size = scatter([row[4] for row in decoded_rows], np.int64)
    orig_width = scatter([d.width for d in images], np.int64)
    orig_height = scatter([d.height for d in images], np.int64)
    orientation = scatter([d.orientation for d in images], np.int64, 1)
    animated = scatter([d.animated for d in images], bool, False)
    passthrough = scatter([d.passthrough for d in images], bool, False)
    small = [i for i, a in enumerate(canonical) if a.shape == (THUMB_SIZE, THUMB_SIZE)]
    if small:  # already thumbnail-sized: copied in one go (the others were made in the loop)
        thumbs[ok_index[small]] = np.stack([canonical[i] for i in small]) if len(small) > 1 else canonical[small[0]]
    if state is not None:
        state[2] = 0.0  # what follows is bounded numpy work on the chunk's decoded pixels
    # Features of the whole chunk at once (stacked numpy), scattered to the decoded rows.
    features = pixel_features(canonical)
    for name, values in features.items():
        full = np.zeros(n, dtype=values.dtype) if values.dtype.kind == "i" else np.full(n, np.nan)
        full[ok_column] = values
        columns[name] = full
    columns["file_size"] = file_size
    columns["ok"] = ok_column
    columns["orig_width"] = orig_width
    columns["orig_height"] = orig_height
    columns["orientation"] = orientation
    columns["animated"] = animated
    columns["passthrough"] = passthrough
    phash, compare = perceptual_hashes(thumbs)
    result: dict[str, Any] = dict(columns)
    result["phash"] = phash
    result["compare"] = compare
    result["pixels"] = _pack_pixels(pixels)
    return result


def _pack_pixels(pixels: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays kept by a chunk as three arrays: positions, shapes and the bytes end to end.

    A chunk returns hundreds of small arrays; pickled one by one each carries ~0.5 KB of
    overhead (more than a 16x16 image) and costs the parent an object to rebuild.
    """
    positions = np.fromiter(pixels.keys(), dtype=np.int32, count=len(pixels))
    shapes = np.zeros((len(pixels), 3), dtype=np.int32)
    for row, array in enumerate(pixels.values()):
        shapes[row, : array.ndim] = array.shape
    data = np.concatenate([a.reshape(-1) for a in pixels.values()]) if pixels else np.zeros(0, dtype=np.uint8)
    return {"positions": positions, "shapes": shapes, "data": data}


def _unpack_pixels(packed: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """``(chunk position, array)`` per kept array, each a view into the packed bytes."""
    positions = packed["positions"].tolist()
    data = packed["data"]
    shapes = packed["shapes"]
    if len(shapes) and (shapes == shapes[0]).all():  # the usual case: one shape per chunk
        height, width, channels = shapes[0].tolist()
        shape = (len(shapes), height, width) if channels == 0 else (len(shapes), height, width, channels)
        return list(zip(positions, data.reshape(shape), strict=True))
    out = []
    offset = 0
    for position, (height, width, channels) in zip(positions, shapes.tolist(), strict=True):
        size = height * width * (channels or 1)
        out.append((position, data[offset : offset + size].reshape((height, width) if channels == 0 else (height, width, channels))))
        offset += size
    return out


# ---------------------------------------------------------------------------- worker pool


_THREADPOOLS: Any = None  # threadpoolctl controller, made once per process (~3 ms)
# True while single_threaded_blas() holds BLAS at one thread (or it is pinned there), so a
# child forked then knows its BLAS has no threads (spawned and forkserver children start
# with the default).
_FORKED_SINGLE_THREADED = False


def _threadpools() -> Any:
    """The process's threadpoolctl controller, or ``None`` without threadpoolctl."""
    global _THREADPOOLS
    if _THREADPOOLS is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            logger.debug("threadpoolctl not installed; BLAS threads left as they are")
            _THREADPOOLS = False
        else:
            _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS or None


def _single_threaded_numerics() -> None:
    """Keep each worker on one core: the pool is the parallelism.

    numpy's OpenBLAS otherwise starts a thread per core for the chunk's small matrix
    products (the pHash DCT) and its threads spin while waiting, so two workers on two
    cores would fight four busy threads.
    """
    if _FORKED_SINGLE_THREADED or _BLAS_PINNED:
        # Forked at one BLAS thread already; calling into OpenBLAS here would (re)create
        # its thread pool in this child, the very threads that we avoid.
        return
    controller = _threadpools()
    if controller is not None:
        controller.limit(limits=1)  # applied for the rest of the worker's life


_SINGLE_THREADED_DEPTH = 0
_BLAS_PINNED = False  # set by pin_single_threaded_blas(), for the rest of the process


def pin_single_threaded_blas() -> None:
    """Set this process's BLAS (numpy's OpenBLAS) to one thread for the rest of its life.

    :func:`single_threaded_blas` restores the caller's thread count when it ends, and on a
    process that has forked decode workers that restore makes OpenBLAS start fresh helper
    threads, which busy-wait for about 0.1 s: measured, they slowed the next 0.1 s of
    work in the process by half. Cleaning pins instead: a Dagster step's process cleans
    once and then only validates; numpy code run later in the same process (``cvops run``)
    gets one BLAS thread (torch keeps its own thread pool).
    """
    global _BLAS_PINNED
    controller = _threadpools()
    if controller is not None and not _BLAS_PINNED:
        controller.limit(limits=1, user_api="blas")
        _BLAS_PINNED = True


@contextlib.contextmanager
def single_threaded_blas() -> Any:
    """Single-threaded BLAS in this process for the block (re-entrant).

    Decode workers are forked inside it: OpenBLAS re-creates its thread pool in a forked
    child at the thread count in force at the fork, and those threads spin on the child's
    first matrix products (measured: they doubled the first chunks' time). It is held for
    the whole pool's life, not toggled around each fork: every return to more threads
    makes OpenBLAS start fresh helper threads that spin for a while (measured: ~0.1 s of
    CPU per restore, taken from the workers on a small machine). The caller's setting is
    restored when the outermost block ends, unless :func:`pin_single_threaded_blas` has
    pinned it at one thread.
    """
    global _FORKED_SINGLE_THREADED, _SINGLE_THREADED_DEPTH
    controller = _threadpools()
    if controller is None or _SINGLE_THREADED_DEPTH or _BLAS_PINNED:
        outermost = controller is not None and not _SINGLE_THREADED_DEPTH
        _SINGLE_THREADED_DEPTH += 1
        if outermost:  # pinned at one thread already: nothing to set or restore
            _FORKED_SINGLE_THREADED = True
        try:
            yield
        finally:
            _SINGLE_THREADED_DEPTH -= 1
            if outermost:
                _FORKED_SINGLE_THREADED = False
        return
    with controller.limit(limits=1, user_api="blas"):
        _SINGLE_THREADED_DEPTH += 1
        _FORKED_SINGLE_THREADED = True
        try:
            yield
        finally:
            _SINGLE_THREADED_DEPTH -= 1
            _FORKED_SINGLE_THREADED = False


def _keep_freed_memory() -> None:
    """Have glibc's malloc reuse freed memory in this worker instead of unmapping it.

    By default an allocation over ~128 KB is a fresh ``mmap`` (and the top of the heap is
    given back once 128 KB is free), so every chunk's numpy temporaries and Pillow buffers
    are page-faulted in anew: measured, the features and pHash of a 256-image chunk took
    2.6x as long as with the memory kept. What a worker keeps is bounded (64 MB of free
    heap), and its address space by its ``RLIMIT_AS``. Other C libraries are left as they
    are.
    """
    try:
        import ctypes

        # The symbols already loaded in this process (libc's among them): no library search.
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is None:
            return
        # Up to 32 MB (glibc's largest allowed value) from the heap; up to 64 MB of free
        # heap kept: a chunk's temporaries, not a large image's buffers, stay mapped.
        mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    except (OSError, AttributeError, ValueError):
        logger.debug("malloc tuning not available on this platform")


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def _init_worker(config: DecodeConfig) -> None:
    """Set the limits a decoding worker runs under."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _ENCODED.clear()  # a forked worker must not trust its parent's cache
    if config.silence_stderr:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    warnings.simplefilter("ignore")
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    global _IN_WORKER
    _IN_WORKER = True
    _single_threaded_numerics()
    _keep_freed_memory()
    Image.MAX_IMAGE_PIXELS = config.max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if config.memory_limit_bytes:
        try:
            import resource

            with open("/proc/self/statm") as f:
                current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limit = current + config.memory_limit_bytes
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ImportError, OSError, ValueError):
            logger.debug("address-space limit not available on this platform")


def _worker_main(
    conn: Connection,
    state: Any,
    config: DecodeConfig,
    out_dir: str,
    keep_pixels_up_to: int,
    write_passthrough: bool,
    root: str | None = None,
) -> None:
    """Worker loop: receive ``(seq, items)``, send ``(seq, result)``; ``None`` stops it.

    With ``root``, a task lists keys only and a file's path is ``root + key``.
    """
    _init_worker(config)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            # Nothing to flush or clean up: skip the interpreter's teardown, which takes
            # longer than the exit itself and which the parent would wait for.
            conn.close()
            os._exit(0)
        seq, items = message
        if root is not None:
            items = [(key, root + key) for key in items]
        state[0] = seq
        state[1] = -1
        result = process_chunk(items, config, out_dir, state, keep_pixels_up_to, write_passthrough)
        state[1] = -1
        del result["key"]  # the parent knows what it sent
        conn.send((seq, result))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    state: Any
    # Chunks sent and not yet answered; the first is the one being worked on.
    tasks: deque[tuple[int, list[tuple[str, str]]]] = field(default_factory=deque)
    sent_at: float = 0.0  # when the first of `tasks` was sent


@dataclass
class PoolStats:
    """What happened in a :func:`decode_pool` run."""

    workers: int = 0
    chunks: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class DecodePoolError(RuntimeError):
    """Workers keep dying before doing any work (a broken environment, not bad files)."""


def _failure_row(key: str, reason: str, detail: str, position: int) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in _ALL_COLUMNS}
    row.update(key=key, ok=False, reason=reason, reason_detail=detail, position=position)
    return row


_PREFETCH_BYTES = 48 * 1024


def _message_size(task: tuple[int, list[tuple[str, str]]], root: str | None) -> int:
    """A generous estimate of a task message's pickled size."""
    if root is not None:
        return 64 + sum(len(key) + 8 for key, _ in task[1])
    return 64 + sum(len(key) + len(path) + 16 for key, path in task[1])


def _common_root(items: Sequence[tuple[str, str]]) -> str | None:
    """The prefix ``root`` with ``path == root + key`` for every item, if there is one."""
    if not items:
        return None
    key, path = items[0]
    if not path.endswith(key):
        return None
    root = path[: len(path) - len(key)]
    return root if all(path == root + key for key, path in items) else None


def _chunk_size(n_files: int, workers: int, configured: int | None) -> int:
    if configured:
        return max(1, configured)
    # ~4 chunks per worker balances load; 256 bounds the work lost to a killed worker.
    return int(min(256, max(8, -(-n_files // (workers * 4)))))


def schedule_order(items: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The order files are decoded in: grouped by file extension, stable within a group.

    Runs of one format keep one decoder's code and tables hot in the CPU caches; on a mixed
    set (ten formats interleaved) that measured ~25% faster than interleaved order, for the
    cleaning pass and for a bare Pillow loop alike (``cvops bench cleaning`` times both in
    this order). Results are put back in input order.
    """
    return [items[i] for i in _schedule_permutation(items)]


def _schedule_permutation(items: Sequence[tuple[str, str]]) -> list[int]:
    """Input positions in :func:`schedule_order`'s order."""
    groups: dict[str, list[int]] = {}
    for index, (key, _) in enumerate(items):
        dot = key.rfind(".")
        groups.setdefault(key[dot + 1 :].lower() if dot >= 0 else "", []).append(index)
    return [index for extension in sorted(groups) for index in groups[extension]]


def decode_pool(
    items: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike[str],
    config: DecodeConfig = DecodeConfig(),
    workers: int | None = None,
    *,
    keep_pixels_up_to: int = 0,
    write_passthrough: bool = True,
    meanwhile: Callable[[], Any] | None = None,
) -> DecodeOutput:
    """Decode files in worker processes, quarantining the ones that hang or crash.

    Args:
        items: ``(key, local path)`` per file; keys must be unique.
        out_dir: local folder the canonical PNGs are written to as ``<sha256>.png``.
        config: decoding settings and limits.
        workers: worker processes; ``None`` means one per CPU core.
        keep_pixels_up_to: images whose canonical pixels take at most this many bytes and
            that are not already canonical PNGs are not encoded: their pixels come back in
            :attr:`DecodeOutput.pixels` (``canonical_sha`` is ``None``), so the caller
            encodes only the images it keeps (cleaning drops duplicates first).
        write_passthrough: place files that already are canonical PNGs in ``out_dir``
            (a hard link); ``False`` only reports their sha256 (the caller can use the
            raw file itself, which is content addressed too).
        meanwhile: called once in this process after the workers have started on their
            first tasks, for the caller's own preparation while they decode (an exception
            from it stops the workers and propagates); not called without items.

    Returns:
        The columns of every item in input order, hashes, thumbnails and pool statistics.
        The workers may still be exiting: a background thread reaps them (and kills one
        that does not exit within 2 s), so their teardown overlaps the caller's work.

    Raises:
        DecodePoolError: workers die repeatedly before finishing any chunk.
    """
    started = time.perf_counter()
    n_items = len(items)
    if not n_items:  # nothing to decode: no worker is started (``meanwhile`` is not called)
        return _Results(0).finish()
    n_workers = max(1, min(workers or os.cpu_count() or 1, n_items))
    stats = PoolStats(workers=n_workers)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    size = _chunk_size(n_items, n_workers, config.chunk_size)
    pending: deque[tuple[int, list[tuple[str, str]]]] = deque()
    if len({key for key, _ in items}) != n_items:
        raise ValueError("decode_pool needs unique keys")
    root = _common_root(items)
    seq = 0
    order = np.asarray(_schedule_permutation(items), dtype=np.int64)
    # Input position of every item of every task, by task number.
    positions_of: dict[int, np.ndarray] = {}
    for start in range(0, n_items, size):
        chunk = order[start : start + size]
        pending.append((seq, [items[i] for i in chunk.tolist()]))
        positions_of[seq] = chunk
        seq += 1
    results = _Results(n_items)

    ctx = multiprocessing.get_context(config.start_method)
    if config.start_method == "forkserver":
        ctx.set_forkserver_preload(["cvops_dagster.imaging.decoding"])

    def start_worker() -> _Worker:
        parent, child = ctx.Pipe()
        state = ctx.RawArray("d", 3)
        state[0], state[1], state[2] = -1.0, -1.0, 0.0
        process = ctx.Process(
            target=_worker_main,
            args=(child, state, config, str(out_dir), keep_pixels_up_to, write_passthrough, root),
            daemon=True,
            name="cvops-decode",
        )
        # A forked child shares the parent's heap copy-on-write; its garbage collector
        # would write to every object the parent tracks (copying the whole heap page by
        # page). Frozen objects are skipped by the collector, in the child and the parent.
        frozen = ctx.get_start_method() == "fork" and gc.isenabled()
        if frozen:
            gc.freeze()
        try:
            process.start()
        finally:
            if frozen:
                gc.unfreeze()
        child.close()
        return _Worker(process, parent, state)

    def retire(worker: _Worker, reason: str) -> bool:
        """Record the file a dead/killed worker was on, and requeue the rest of its chunk.

        Returns ``False`` when the worker died before starting its chunk (a start-up
        failure, no file to blame): the chunk is requeued whole.
        """
        nonlocal seq
        assert worker.tasks
        for queued in reversed(list(worker.tasks)[1:]):  # never started: retry whole
            pending.appendleft(queued)
        task_seq, task_items = worker.tasks[0]
        worker.tasks.clear()
        if int(worker.state[0]) != task_seq:
            pending.appendleft((task_seq, task_items))
            return False
        position = int(worker.state[1])
        task_positions = positions_of[task_seq]
        if position < 0 and len(task_items) > 1:
            # Died between files: retry each file alone to find the culprit.
            for offset in reversed(range(len(task_items))):
                pending.appendleft((seq, [task_items[offset]]))
                positions_of[seq] = task_positions[offset : offset + 1]
                seq += 1
            return True
        position = max(position, 0)
        key = task_items[position][0]
        if reason == REASON_TIMEOUT:
            detail = f"no result within {config.task_timeout_s:g} s; worker killed"
        else:
            code = worker.process.exitcode
            detail = f"worker exited with {'signal ' + str(-code) if code and code < 0 else 'code ' + str(code)}"
        results.add_failure(_failure_row(key, reason, detail, int(task_positions[position])))
        rest = task_items[:position] + task_items[position + 1 :]
        if rest:
            pending.appendleft((seq, rest))
            positions_of[seq] = np.delete(task_positions, position)
            seq += 1
        return True

    sizes: dict[int, int] = {}

    def message_size(task: tuple[int, list[tuple[str, str]]]) -> int:
        size = sizes.get(task[0])
        if size is None:
            size = sizes[task[0]] = _message_size(task, root)
        return size

    def feed(worker: _Worker) -> None:
        # Keep a second small chunk queued so the worker never waits for us; a large one
        # could fill the pipe while the worker is sending its result.
        while pending and (
            not worker.tasks or (len(worker.tasks) == 1 and message_size(pending[0]) < _PREFETCH_BYTES)
        ):
            if not worker.tasks:
                worker.sent_at = time.monotonic()
            worker.tasks.append(pending.popleft())
            task_seq, task_items = worker.tasks[-1]
            # Paths under a common root travel as keys only: a smaller message, which also
            # lets a second task be queued (see _PREFETCH_BYTES).
            worker.conn.send((task_seq, [key for key, _ in task_items] if root is not None else task_items))

    pool: list[_Worker] = []
    startup_failures = 0
    blas = contextlib.ExitStack()
    try:
        blas.enter_context(single_threaded_blas())  # for the pool's life, see there
        for _ in range(n_workers):  # each starts work before the next is forked
            pool.append(start_worker())
            feed(pool[-1])
        if meanwhile is not None:
            meanwhile()
        while pending or any(w.tasks for w in pool):
            for worker in pool:
                feed(worker)
            busy = [w for w in pool if w.tasks]
            waitables: list[Any] = [w.conn for w in busy] + [w.process.sentinel for w in busy]
            wait(waitables, timeout=0.05)
            now = time.monotonic()
            for index, worker in enumerate(pool):
                if not worker.tasks:
                    continue
                dead_reason = None
                if worker.conn.poll():
                    try:
                        task_seq, result = worker.conn.recv()
                    except (EOFError, OSError):
                        dead_reason = REASON_CRASH
                    else:
                        if worker.tasks[0][0] != task_seq:
                            raise RuntimeError("decode worker answered out of order")
                        result["key"] = [key for key, _ in worker.tasks[0][1]]
                        results.add_chunk(result, positions_of[task_seq])
                        worker.tasks.popleft()
                        worker.sent_at = time.monotonic()
                        stats.chunks += 1
                        startup_failures = 0
                        continue
                if dead_reason is None and not worker.process.is_alive():
                    dead_reason = REASON_CRASH
                if dead_reason is None:
                    began = worker.state[2]
                    started_chunk = int(worker.state[0]) == worker.tasks[0][0]
                    if began and now - began > config.task_timeout_s:
                        dead_reason = REASON_TIMEOUT
                        worker.process.kill()
                    elif not started_chunk and now - worker.sent_at > config.task_timeout_s:
                        dead_reason = REASON_CRASH  # stuck before its chunk: start-up hang
                        worker.process.kill()
                if dead_reason is None:
                    continue
                worker.process.join(timeout=5)
                if dead_reason == REASON_TIMEOUT:
                    stats.timeouts += 1
                else:
                    stats.crashes += 1
                logger.warning("decode worker %s: %s; replacing it", worker.process.pid, dead_reason)
                if retire(worker, dead_reason):
                    startup_failures = 0
                else:
                    startup_failures += 1
                worker.conn.close()
                if startup_failures > 3:
                    raise DecodePoolError(
                        f"decode workers die before starting work (exit code {worker.process.exitcode}); "
                        "with the forkserver/spawn start methods the main module must be importable"
                    )
                pool[index] = start_worker()
                stats.restarts += 1
    except BaseException:
        _stop_workers(pool)
        _join_workers(pool)
        blas.close()
        raise
    _stop_workers(pool)
    # Every worker was forked: the caller's BLAS setting can come back.
    blas.close()
    # Tearing down a forked copy of a large process takes milliseconds of kernel work; it
    # overlaps the caller's own work instead of being waited for here.
    reaper = threading.Thread(target=_join_workers, args=(pool,), name="cvops-decode-reaper", daemon=True)
    reaper.start()
    with _REAPERS_LOCK:
        _REAPERS[:] = [thread for thread in _REAPERS if thread.is_alive()] + [reaper]
    output = results.finish()
    stats.seconds = time.perf_counter() - started
    output.stats = stats
    return output


_REAPERS: list[threading.Thread] = []  # reaper threads of finished pools (pruned as they end)
_REAPERS_LOCK = threading.Lock()


def wait_for_exited_workers(timeout_s: float = 10.0) -> bool:
    """Wait until the workers of finished pools have exited (they are reaped in the background).

    For callers that time one pass after another (benchmarks): a pool's workers tearing
    down would otherwise take CPU from the next pass. Returns ``False`` on timeout.
    """
    deadline = time.monotonic() + timeout_s
    with _REAPERS_LOCK:
        reapers = list(_REAPERS)
    for reaper in reapers:
        reaper.join(max(0.0, deadline - time.monotonic()))
    with _REAPERS_LOCK:
        _REAPERS[:] = [thread for thread in _REAPERS if thread.is_alive()]
        return not any(thread in _REAPERS for thread in reapers)


def _stop_workers(pool: list[_Worker]) -> None:
    """Tell every live worker to exit."""
    for worker in pool:
        try:
            if worker.process.is_alive():
                worker.conn.send(None)
        except (OSError, BrokenPipeError):
            pass


def _join_workers(pool: list[_Worker], grace_s: float = 2.0) -> None:
    """Wait for the workers to exit, killing the ones that do not within ``grace_s``."""
    deadline = time.monotonic() + grace_s
    for worker in pool:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()


class _Results:
    """Results put in input order as they arrive, so little is left to do after the last.

    Every row is filled exactly once, from a chunk result or a failure row, at the input
    position the parent recorded for it.
    """

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.filled = np.zeros(n_items, dtype=bool)
        self.objects = {name: np.full(n_items, None, dtype=object) for name in _OBJECT_COLUMNS}
        self.numbers: dict[str, np.ndarray] = {}
        for name in _ALL_COLUMNS:
            if name in _FLOAT_COLUMNS:
                self.numbers[name] = np.full(n_items, np.nan)
            elif name in _BOOL_COLUMNS:
                self.numbers[name] = np.zeros(n_items, dtype=bool)
            elif name not in _OBJECT_COLUMNS:
                self.numbers[name] = np.zeros(n_items, dtype=np.int64)
        self.phash = np.zeros(n_items, dtype=np.uint64)
        self.compare = np.zeros((n_items, 16, 16), dtype=np.uint8)
        self.pixels = np.full(n_items, None, dtype=object)

    def _claim(self, positions: np.ndarray) -> None:
        if len(positions) and self.filled[positions].any():
            raise RuntimeError("decode pool returned a file twice")
        self.filled[positions] = True

    def add_chunk(self, result: dict[str, Any], positions: np.ndarray) -> None:
        """Place a chunk's rows (``positions``: the input position of each)."""
        self._claim(positions)
        for name, column in self.objects.items():
            column[positions] = np.array(result[name], dtype=object)
        for name, column in self.numbers.items():
            column[positions] = result[name]
        self.phash[positions] = result["phash"]
        self.compare[positions] = result["compare"]
        for chunk_position, array in _unpack_pixels(result["pixels"]):
            self.pixels[positions[chunk_position]] = array

    def add_failure(self, row: dict[str, Any]) -> None:
        """Place a failure row (see :func:`_failure_row`)."""
        position = int(row["position"])
        self._claim(np.array([position]))
        for name, column in self.objects.items():
            column[position] = row[name]
        self.numbers["ok"][position] = False

    def finish(self) -> DecodeOutput:
        """The columns in input order, once every row is filled."""
        if not self.filled.all():
            raise RuntimeError(f"decode pool returned {int(self.filled.sum())} results for {self.n_items} files")
        return DecodeOutput(self.objects, self.numbers, self.phash, self.compare, self.pixels, PoolStats(workers=0))


@dataclass
class DecodeOutput:
    """What :func:`decode_pool` decoded, one entry per item in input order.

    Attributes:
        objects: the text columns (object arrays, ``None`` where missing).
        numbers: the numeric and boolean columns (numpy arrays; a failed item holds 0,
            ``False`` or NaN, shown as missing by :meth:`frame` and :meth:`column`).
        phash, compare: uint64 pHashes and (N, 16, 16) comparison thumbnails.
        pixels: kept canonical arrays (object array, ``None`` where not kept).
        stats: pool statistics.
    """

    objects: dict[str, np.ndarray]
    numbers: dict[str, np.ndarray]
    phash: np.ndarray
    compare: np.ndarray
    pixels: np.ndarray
    stats: PoolStats

    @property
    def ok(self) -> np.ndarray:
        return self.numbers["ok"]

    def column(self, name: str, rows: np.ndarray | None = None) -> Any:
        """One column, optionally taken at ``rows`` (``-1``: a missing row).

        Text columns come as object arrays (``None`` where missing), integer and the
        ``animated``/``passthrough`` columns as pandas nullable arrays (missing where the
        item failed), the rest as numpy arrays. Without ``rows`` the text, float and
        ``ok`` arrays are this output's own (not copies): do not modify them.
        """

        def take(values: np.ndarray, fill: Any) -> np.ndarray:
            return values if rows is None else _take(values, rows, fill)

        ok = take(self.ok, False)
        if name == "ok":
            return ok
        if name in self.objects:
            return take(self.objects[name], None)
        if name == "pixels":
            return take(self.pixels, None)
        if name in _FLOAT_COLUMNS:
            return take(self.numbers[name], np.nan)
        values = take(self.numbers[name], 0)
        if name in _INT_COLUMNS:
            return pd.arrays.IntegerArray(np.asarray(values, dtype=np.int64), ~ok)
        return pd.arrays.BooleanArray(np.asarray(values, dtype=bool), ~ok)

    def frame(self) -> pd.DataFrame:
        """All columns as one frame (input order)."""
        columns: dict[str, Any] = {}
        for name in _ALL_COLUMNS:
            if name in self.objects:
                # Explicitly object: inferring Arrow strings costs more than the frame's users save.
                columns[name] = pd.Series(self.objects[name], dtype=object, copy=False)
            else:
                columns[name] = self.column(name)
        columns["pixels"] = self.pixels
        return pd.DataFrame(columns, columns=[*_ALL_COLUMNS, "pixels"])


def _take(values: np.ndarray, rows: np.ndarray, fill: Any) -> np.ndarray:
    """``values[rows]`` with ``fill`` where a row is ``-1`` (``values`` may be empty)."""
    have = rows >= 0
    if not len(values):
        return np.full(len(rows), fill, dtype=values.dtype)
    out = values[np.where(have, rows, 0)]
    out[~have] = fill
    return out


def default_scratch_dir() -> Path:
    """A fresh temporary folder for staging files when storage is not local."""
    return Path(tempfile.mkdtemp(prefix="cvops-decode-"))
