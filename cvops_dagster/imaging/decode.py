"""Safe decoding: untrusted bytes to one canonical 8-bit image, or a reason code.

:func:`decode_image` is the one decoder, used by cleaning (in the sandbox's workers) and by
the predictor, so a served file is seen exactly as a training file was:

- the format is detected from magic bytes, never from the extension, and must be in the
  allow-list; Pillow is then told to use only that plugin;
- PNG chunk checksums are verified (Pillow skips the CRC of image-data chunks on ``load``);
- the declared size is checked against a pixel limit far below Pillow's default before any
  pixel is decoded, and Pillow's own bomb warning is an error;
- the whole image is decoded with ``load()`` (``verify()`` checks far less), and
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set, so a truncated file fails;
- EXIF orientation is applied, animated images keep their first frame, and the mode is
  normalised (:mod:`cvops_dagster.imaging.normalise`);
- every decoder exception is caught and classified (:mod:`cvops_dagster.imaging.policy`).

Isolation from hangs, crashes and memory exhaustion is the sandbox's job
(:mod:`cvops_dagster.imaging.sandbox`), not this module's.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cvops_dagster.imaging.formats import check_png_chunks, sniff_format
from cvops_dagster.imaging.normalise import normalise_mode
from cvops_dagster.imaging.policy import (
    REASON_BOMB,
    REASON_CHECKSUM,
    REASON_DECODE,
    REASON_EMPTY,
    REASON_FORMAT,
    REASON_MEMORY,
    REASON_MISSING,
    REASON_TRUNCATED,
    REASON_UNREADABLE,
    DecodeConfig,
    DecodeFailure,
)

_ORIENTATION_TAG = 0x0112
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# Everything a Pillow plugin has been seen to raise on hostile input; each becomes a reason.
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, EOFError,
    Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError, NotImplementedError,
    TypeError, ZeroDivisionError, AttributeError, RuntimeError, AssertionError, ArithmeticError,
    LookupError,
)  # fmt: skip


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


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig()) -> DecodedImage:
    """Decode untrusted bytes into a canonical image.

    Safe to call in any process: the pixel limit is checked here, not through Pillow's
    global, and warnings are only changed inside this call.

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode_checked(data, fmt, config)
    except DecodeFailure:
        raise
    except _DECODER_ERRORS as exc:
        reason, detail = classify(exc)
        raise DecodeFailure(reason, detail) from exc


def _decode_checked(data: bytes, fmt: str, config: DecodeConfig) -> DecodedImage:
    """:func:`decode_image` once the format is known to be allowed."""
    plain_png = check_png_chunks(data) if fmt == "PNG" else False
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
    image, orientation = _apply_orientation(image, fmt)
    canonical = normalise_mode(image, config)
    # The raw bytes are the canonical PNG when nothing was changed and the file is an
    # 8-bit gray or RGB, non-interlaced PNG with only IHDR/IDAT/IEND (bytes 24-28 of IHDR).
    passthrough = (
        plain_png
        and orientation == 1
        and not animated
        and canonical is image
        and data[24] == 8
        and data[25] in (0, 2)
        and data[28] == 0
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


def _apply_orientation(image: Image.Image, fmt: str) -> tuple[Image.Image, int]:
    """The image turned upright by its EXIF orientation, and that orientation (1: none)."""
    info = image.info
    # getexif() parses EXIF (and XMP) on every call; only images carrying either can have
    # an orientation, and a TIFF holds it as a plain tag.
    if not (
        "exif" in info
        or "Raw profile type exif" in info
        or "xmp" in info
        or "XML:com.adobe.xmp" in info
        or (fmt == "TIFF" and _ORIENTATION_TAG in getattr(image, "tag_v2", {}))
    ):
        return image, 1
    try:
        orientation = int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except (OSError, ValueError, SyntaxError, struct.error, TypeError, KeyError, IndexError):
        return image, 1  # unreadable EXIF: keep the stored orientation
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image, 1
    return ImageOps.exif_transpose(image), orientation


def _canonical_array(image: Image.Image) -> np.ndarray:
    """The pixels of an "L" or "RGB" image as a C-contiguous uint8 array (one copy)."""
    width, height = image.size
    shape = (height, width) if image.mode == "L" else (height, width, 3)
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(shape)


def classify(exc: BaseException) -> tuple[str, str]:
    """Map a decoder exception to ``(reason, detail)``."""
    if isinstance(exc, DecodeFailure):
        return exc.reason, exc.detail
    # Without object addresses ("<_io.BytesIO object at 0x7f...>"): the same file gives the
    # same detail in every run, decoded now or read from the decode cache.
    detail = _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")[:300]
    message = str(exc).lower()
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return REASON_BOMB, detail
    if isinstance(exc, MemoryError):
        return REASON_MEMORY, detail
    if "truncated" in message or isinstance(exc, EOFError):
        return REASON_TRUNCATED, detail
    if "crc" in message:
        return REASON_CHECKSUM, detail
    return REASON_DECODE, detail


def read_file(path: str) -> bytes:
    """The whole file at ``path``.

    Raises:
        DecodeFailure: ``missing_image`` when it does not exist, ``unreadable`` on any other
            error.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise DecodeFailure(REASON_MISSING, str(exc)) from exc
    except OSError as exc:
        raise DecodeFailure(REASON_UNREADABLE, str(exc)) from exc


def encode_png(image: Image.Image | np.ndarray, compress_level: int = 1) -> bytes:
    """The canonical PNG bytes of an "L" or "RGB" image or array (no metadata chunks)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()
