"""Mode normalisation: any decoded Pillow image to its natural canonical mode, "L" or "RGB".

The rules are :data:`~cvops_dagster.imaging.policy.NORMALISATION_POLICY`: palette, CMYK,
YCbCr and other modes become RGB; alpha (RGBA, LA, palette with transparency) is composited
on a fixed background; 16-bit and 32-bit integer images are scaled by bit shift (a 16-bit
ramp keeps 256 levels, nothing is clipped); float images are scaled to their range. An RGB
image whose channels agree within a tolerance is grayscale ("L"), otherwise it stays "RGB"
(its "natural mode"); cleaning picks the dataset's one mode from these.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cvops_dagster.imaging.policy import REASON_MODE, DecodeConfig, DecodeFailure

# 16-bit modes and the shift that keeps their top 8 bits.
_HIGH_BIT_MODES = {"I;16": 8, "I;16L": 8, "I;16B": 8, "I;16N": 8, "I;16S": 8}


def normalise_mode(image: Image.Image, config: DecodeConfig = DecodeConfig()) -> Image.Image:
    """Convert a decoded image to its natural canonical mode, "L" or "RGB".

    Args:
        image: a loaded Pillow image of any mode.
        config: the background colour and the grayscale tolerance.

    Returns:
        The image in "L" or "RGB" (``image`` itself when it already is canonical).

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
        result = _from_palette(image, config)
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        result = _composite(image, config.background)
    else:  # CMYK, YCbCr, HSV, LAB, RGBX...
        try:
            result = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise DecodeFailure(REASON_MODE, f"cannot convert mode {mode}: {exc}") from exc
    if result.mode == "RGB" and result.width and result.height and is_gray(result, config.gray_tolerance):
        result = result.convert("L")
    return result


def is_gray(image: Image.Image, tolerance: int) -> bool:
    """Whether the channels of an RGB image differ by at most ``tolerance`` everywhere.

    Such an image becomes "L" with Pillow's luma conversion (exact when the channels are
    equal: the luma weights sum to one).
    """
    raw = image.tobytes()
    red, green, blue = raw[0::3], raw[1::3], raw[2::3]
    if red == green == blue:  # the common exact case, without numpy
        return True
    if tolerance <= 0:
        return False
    # Element-wise on the three planes: a reduction over a last axis of 3 is ~10x slower.
    r, g, b = (np.frombuffer(plane, dtype=np.uint8) for plane in (red, green, blue))
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return int(spread.max()) <= tolerance


def _from_palette(image: Image.Image, config: DecodeConfig) -> Image.Image:
    """A palette image as RGB, composited when it has transparency, "L" for a gray palette."""
    palette = image.palette
    if "transparency" in image.info or (palette is not None and palette.mode == "RGBA"):
        return _composite(image, config.background)
    if palette is not None and palette.mode == "RGB":
        entries = palette.tobytes()
        if len(entries) % 3 == 0 and entries[0::3] == entries[1::3] == entries[2::3]:
            return image.convert("L")  # exact: every entry has R = G = B
    return image.convert("RGB")


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An image with alpha composited on ``background``, as RGB."""
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
