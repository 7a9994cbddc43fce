"""Distribution shifts: pure image transforms that turn in-distribution images into drifted ones.

They build the drifted production stream of the bundled sample and the drift-detection
benchmark, so both measure the same shifts. Every transform takes a ``uint8`` array, ``(H, W)``
grayscale or ``(H, W, 3)`` colour, and returns a new ``uint8`` array of the same mode (and of
the same size, except :func:`new_camera`, which changes the resolution on purpose). Nothing
here knows about digits: any image works. Randomness comes only from the
:class:`numpy.random.Generator` passed in, so a seed reproduces a shifted set exactly.

:data:`SHIFTS` names the shifts the benchmark and the sample stream use; :func:`apply_shift`
applies one of them to a list of images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)

#: How much larger a :func:`new_camera` image is than its input (32x32 -> 40x40).
NEW_CAMERA_SCALE = 1.25
#: The :func:`new_camera` tone curve: ``out = 255 * (in / 255) ** gamma`` after inversion.
NEW_CAMERA_GAMMA = 0.6
#: Standard deviation of the :func:`new_camera` sensor noise, on 0..255.
NEW_CAMERA_NOISE_STD = 4.0
#: Gaussian sigma of the :func:`new_camera` optics, in input pixels.
NEW_CAMERA_BLUR_SIGMA = 0.6
#: Standard deviation of the registry's ``noise`` shift, on 0..255.
NOISE_STD = 20.0


def _check(image: np.ndarray) -> np.ndarray:
    """``image`` itself when it is a ``uint8`` ``(H, W)`` or ``(H, W, 3)`` array; else ValueError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy array, got {getattr(image, 'dtype', type(image))}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
        if image.shape[0] and image.shape[1]:
            return image
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round and clip float pixel values back to ``uint8``."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def border_value(image: np.ndarray) -> int | tuple[int, int, int]:
    """The image's background: the median of its outermost pixels (per channel for colour).

    Rotation fills the corners it uncovers with it, so a rotated image gains no frame that a
    drift test would notice for the wrong reason.
    """
    image = _check(image)
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    median = np.median(border, axis=0)
    if image.ndim == 2:
        return int(np.rint(median))
    return tuple(int(v) for v in np.rint(median))  # type: ignore[return-value]


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate ``image`` by ``degrees`` counter-clockwise about its centre, keeping its size.

    Bilinear interpolation; the uncovered corners take :func:`border_value`.
    """
    image = _check(image)
    rotated = Image.fromarray(image).rotate(
        degrees, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=border_value(image)
    )
    return np.asarray(rotated, dtype=np.uint8).copy()


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Multiply every pixel by ``factor`` (1.3: 30% brighter, 0.7: 30% darker), clipped to 0..255."""
    if factor < 0:
        raise ValueError(f"brightness factor must be >= 0, got {factor}")
    return _to_uint8(_check(image).astype(np.float64) * factor)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur with a Gaussian of standard deviation ``sigma`` pixels (Pillow's ``GaussianBlur``,
    whose radius is the standard deviation); ``sigma`` 0 returns a copy."""
    image = _check(image)
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return image.copy()
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma))
    return np.asarray(blurred, dtype=np.uint8).copy()


def additive_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add independent Gaussian noise of standard deviation ``std`` (on 0..255) to every pixel
    and channel, clipped to 0..255: a noisier sensor or a worse exposure."""
    image = _check(image)
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return _to_uint8(image.astype(np.float64) + rng.normal(0.0, std, size=image.shape))


def new_camera(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same scene as a different sensor renders it.

    The ways cameras differ, together: inverted polarity (dark strokes on a light
    background), a gamma tone curve (:data:`NEW_CAMERA_GAMMA`), softer optics (a Gaussian of
    :data:`NEW_CAMERA_BLUR_SIGMA`), another resolution (:data:`NEW_CAMERA_SCALE` times the
    input's height and width, e.g. 32x32 -> 40x40) and a little sensor noise
    (:data:`NEW_CAMERA_NOISE_STD`, drawn from ``rng``). A grayscale input stays grayscale;
    a colour input gets the same treatment on every channel.
    """
    image = _check(image)
    inverted = 255.0 - image.astype(np.float64)
    toned = _to_uint8(255.0 * (inverted / 255.0) ** NEW_CAMERA_GAMMA)
    soft = gaussian_blur(toned, NEW_CAMERA_BLUR_SIGMA)
    height, width = image.shape[:2]
    size = (max(1, round(width * NEW_CAMERA_SCALE)), max(1, round(height * NEW_CAMERA_SCALE)))
    resized = np.asarray(Image.fromarray(soft).resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)
    return additive_noise(resized, NEW_CAMERA_NOISE_STD, rng)


Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]

#: The named shifts (image, rng) -> shifted image; deterministic ones ignore ``rng``.
SHIFTS: dict[str, Shift] = {
    "rotation_15": lambda image, rng: rotate(image, 15.0),
    "rotation_30": lambda image, rng: rotate(image, 30.0),
    "brightness_up_30": lambda image, rng: brightness(image, 1.3),
    "brightness_down_30": lambda image, rng: brightness(image, 0.7),
    "blur_1.5": lambda image, rng: gaussian_blur(image, 1.5),
    "noise": lambda image, rng: additive_noise(image, NOISE_STD, rng),
    "new_camera": new_camera,
}


def apply_shift(name: str, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """Apply the shift ``name`` of :data:`SHIFTS` to every image, in order.

    One generator seeded with ``seed`` serves the whole list, so the same images, name and
    seed give the same output.

    Raises:
        ValueError: ``name`` is not a known shift (the message lists them), or an image is not
            a ``uint8`` ``(H, W)`` / ``(H, W, 3)`` array.
    """
    try:
        shift = SHIFTS[name]
    except KeyError:
        raise ValueError(f"unknown shift {name!r}; known shifts: {', '.join(SHIFTS)}") from None
    rng = np.random.default_rng(seed)
    shifted = [shift(image, rng) for image in images]
    logger.debug("applied shift %s to %d images (seed %d)", name, len(shifted), seed)
    return shifted


__all__ = [
    "SHIFTS",
    "Shift",
    "additive_noise",
    "apply_shift",
    "border_value",
    "brightness",
    "gaussian_blur",
    "new_camera",
    "rotate",
]
