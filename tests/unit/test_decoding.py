"""Safe decoding and normalisation: each bad input gets its reason, odd modes their form.

The decode sandbox (worker processes, timeouts, crashes) is tested in test_sandbox.py.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cvops_dagster.imaging import policy
from cvops_dagster.imaging.decode import decode_image, read_file
from cvops_dagster.imaging.formats import check_png_chunks, sniff_format
from cvops_dagster.imaging.hashes import pixel_hash
from cvops_dagster.imaging.normalise import normalise_mode
from cvops_dagster.imaging.policy import DecodeConfig, DecodeFailure, policy_key

from tests.unit.rawdata import encode, textured


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG of a few dozen bytes declaring a huge size."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _bad_crc_png() -> bytes:
    data = bytearray(encode(textured(16, 16, seed=1)))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # a byte of compressed pixel data; the stored CRC no longer matches
    return bytes(data)


def _bad_cases() -> list[tuple[str, bytes, str]]:
    jpeg = encode(textured(64, 64, seed=2), "JPEG", quality=90)
    png = encode(textured(64, 64, seed=3))
    return [
        ("zero_byte", b"", policy.REASON_EMPTY),
        ("text_renamed_png", b"this is a text file, not a picture\n" * 4, policy.REASON_FORMAT),
        ("truncated_jpeg", jpeg[: len(jpeg) // 2], policy.REASON_TRUNCATED),
        ("truncated_png", png[: len(png) // 2], policy.REASON_TRUNCATED),
        ("png_bad_crc", _bad_crc_png(), policy.REASON_CHECKSUM),
        ("pixel_bomb", _bomb_png(), policy.REASON_BOMB),
        ("pcx_renamed_jpg", encode(textured(16, 16, seed=4), "PCX"), policy.REASON_FORMAT),
        ("ppm_renamed_jpg", encode(textured(16, 16, seed=5), "PPM"), policy.REASON_FORMAT),
        ("ico_renamed_jpg", encode(textured(16, 16, seed=6), "ICO"), policy.REASON_FORMAT),
    ]


@pytest.mark.parametrize(("name", "data", "reason"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_refused_with_its_reason(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(DecodeFailure) as caught:
        decode_image(data)
    assert caught.value.reason == reason, caught.value.detail
    with pytest.raises(DecodeFailure) as again:
        decode_image(data)
    assert again.value.detail == caught.value.detail  # no object address in the text


def test_failure_detail_is_the_same_in_every_run() -> None:
    data = b"\xff\xd8\xff" + b"0" * 50  # JPEG magic, then nothing Pillow can identify
    details = set()
    for _ in range(3):
        with pytest.raises(DecodeFailure) as caught:
            decode_image(data)
        details.add(caught.value.detail)
    assert len(details) == 1 and " at 0x" not in details.pop()


def test_bomb_pillow_would_accept_is_refused_by_the_lower_limit() -> None:
    data = encode(Image.new("L", (200, 200), 7))
    assert decode_image(data).image.size == (200, 200)
    with pytest.raises(DecodeFailure) as caught:
        decode_image(data, DecodeConfig(max_pixels=10_000))
    assert caught.value.reason == policy.REASON_BOMB


def test_truncated_images_flag_is_never_set() -> None:
    from PIL import ImageFile

    jpeg = encode(textured(64, 64, seed=2), "JPEG")
    with pytest.raises(DecodeFailure):
        decode_image(jpeg[:-200])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 8, "PNG"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 12, "JPEG"),
        (b"GIF89a" + b"\0" * 10, "GIF"),
        (b"BM" + b"\0" * 14, "BMP"),
        (b"II*\x00" + b"\0" * 12, "TIFF"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "WEBP"),
        (b"P6\n16 16\n255\n", None),
        (b"\x0a\x05\x01\x08" + b"\0" * 12, None),
    ],
)
def test_format_comes_from_magic_bytes(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


def test_extension_is_irrelevant_jpeg_named_png_decodes() -> None:
    decoded = decode_image(encode(textured(20, 10, seed=7), "JPEG"))
    assert decoded.format == "JPEG"
    assert decoded.image.size == (20, 10)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (24, 16), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(encode(cmyk, "JPEG", quality=95))
    assert decoded.mode == "CMYK"
    assert decoded.image.mode == "RGB"
    red, green, blue = np.asarray(decoded.image).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_palette_with_transparency_is_composited_on_the_background() -> None:
    palette_image = Image.new("P", (8, 8), 0)
    palette_image.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    palette_image.putpixel((0, 0), 1)
    data = encode(palette_image, transparency=0)  # index 0 (blue) is transparent
    decoded = decode_image(data, DecodeConfig(background=(255, 255, 255)))
    pixels = np.asarray(decoded.image)
    assert decoded.mode == "P"
    assert decoded.image.mode == "RGB"
    assert tuple(pixels[1, 1]) == (255, 255, 255)  # transparent blue -> background
    assert tuple(pixels[0, 0]) == (255, 0, 0)


def test_rgba_is_composited_on_a_fixed_background() -> None:
    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 128))
    decoded = decode_image(encode(rgba), DecodeConfig(background=(255, 255, 255)))
    assert decoded.mode == "RGBA" and decoded.image.mode == "RGB"
    red, green, blue = np.asarray(decoded.image)[0, 0]
    assert red == 255 and 120 <= green <= 135 and green == blue


def test_la_becomes_grayscale() -> None:
    la = Image.merge("LA", [Image.new("L", (5, 5), 40), Image.new("L", (5, 5), 255)])
    decoded = decode_image(encode(la))
    assert decoded.image.mode == "L"
    assert int(np.asarray(decoded.image)[0, 0]) == 40


def test_16_bit_ramp_is_scaled_to_256_levels() -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    source = Image.fromarray(ramp)
    assert source.mode.startswith("I;16")
    decoded = decode_image(encode(source))
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "L"
    assert len(np.unique(pixels)) == 256  # scaled, not clipped
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation: int, turns: int) -> None:
    base = textured(40, 20, seed=8, mode="L")
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(base, exif=exif.tobytes()))
    assert decoded.orientation == orientation
    assert (decoded.width, decoded.height) == (40, 20)  # the stored size is recorded
    assert decoded.image.size == (20, 40)  # width and height swapped
    np.testing.assert_array_equal(np.asarray(decoded.image), np.rot90(np.asarray(base), k=turns))
    assert not decoded.passthrough


def test_animated_gif_keeps_the_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (10, 10), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image(buffer.getvalue())
    assert decoded.animated
    red, green, blue = np.asarray(decoded.image)[5, 5]
    assert red > 200 and blue < 50


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF", "WEBP"])
def test_gray_content_is_L_in_every_lossless_format(fmt: str) -> None:
    gray = textured(16, 12, seed=9, mode="L")
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(gray.convert("RGB") if fmt == "WEBP" else gray, fmt, **params))
    assert decoded.image.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(gray))


def test_plain_png_is_its_own_canonical_form() -> None:
    data = encode(textured(16, 16, seed=10, mode="L"))
    assert decode_image(data).passthrough
    assert not decode_image(encode(textured(16, 16, seed=10, mode="L"), "BMP")).passthrough


def _plain_png_cases() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(50)
    gray_rgb = np.repeat(rng.integers(0, 256, (9, 11, 1), dtype=np.uint8), 3, axis=2)
    images = {
        "L-1x1": Image.fromarray(rng.integers(0, 256, (1, 1), dtype=np.uint8)),
        "L-3x7": Image.fromarray(rng.integers(0, 256, (3, 7), dtype=np.uint8)),
        "L-32x32": Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)),
        "RGB-colour": Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)),
        "RGB-gray": Image.fromarray(gray_rgb),
    }
    return [(f"{name}-z{level}", encode(image, compress_level=level)) for name, image in images.items() for level in (0, 1, 9)]


@pytest.mark.parametrize(("name", "data"), _plain_png_cases(), ids=[c[0] for c in _plain_png_cases()])
def test_plain_png_decodes_as_pillows_png_plugin_and_the_mode_rule(name: str, data: bytes) -> None:
    decoded = decode_image(data)
    with Image.open(io.BytesIO(data)) as reference:
        expected = normalise_mode(reference.convert(reference.mode))
    assert decoded.image.mode == expected.mode
    assert decoded.image.tobytes() == expected.tobytes()
    assert decoded.passthrough == (expected.mode == Image.open(io.BytesIO(data)).mode)
    assert (decoded.format, decoded.orientation, decoded.animated) == ("PNG", 1, False)
    assert check_png_chunks(data) is True  # only IHDR/IDAT/IEND


def _replace_idat(data: bytes, payload: bytes) -> bytes:
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    return data[:start] + _png_chunk(b"IDAT", payload) + data[start + 12 + length :]


def _idat_payload(data: bytes) -> bytes:
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4 : start])
    return data[start + 4 : start + 4 + length]


@pytest.mark.parametrize(
    ("case", "reason"),
    [("short_stream", policy.REASON_TRUNCATED), ("corrupt_stream", policy.REASON_DECODE), ("bad_crc", policy.REASON_CHECKSUM)],
)
def test_png_with_damaged_image_data_is_refused(case: str, reason: str) -> None:
    good = encode(Image.fromarray(np.random.default_rng(51).integers(0, 256, (32, 32), dtype=np.uint8)))
    payload = _idat_payload(good)
    if case == "short_stream":  # valid CRCs, pixel data ends early
        data = _replace_idat(good, payload[: len(payload) // 2])
    elif case == "corrupt_stream":  # valid CRCs, garbage inside the zlib stream
        broken = bytearray(payload)
        broken[5] ^= 0x55
        data = _replace_idat(good, bytes(broken))
    else:
        broken = bytearray(good)
        broken[good.index(b"IDAT") + 10] ^= 0xFF
        data = bytes(broken)
    with pytest.raises(DecodeFailure) as caught:
        decode_image(data)
    assert caught.value.reason == reason


def _reference_canonical(data: bytes, tolerance: int = 2) -> np.ndarray:
    """Pillow's own decode followed by the documented rule, step by step (no fast path)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = image.convert("RGB") if image.mode != "L" else image
    if rgb.mode == "RGB":
        array = np.asarray(rgb).astype(np.int16)
        if int((array.max(axis=2) - array.min(axis=2)).max()) <= tolerance:
            return np.asarray(rgb.convert("L"))
    return np.asarray(rgb)


@pytest.mark.parametrize(
    "case",
    ["gray_png", "rgb_png", "near_gray_rgb_png", "exact_gray_rgb_png", "gray_palette_gif", "colour_palette_gif", "multi_idat_png"],
)
def test_decode_matches_pillow_and_the_mode_rule(case: str) -> None:
    """Plain PNGs, near-gray RGB and palettes (gray ones converted straight to L) give
    exactly the pixels of Pillow's decode plus the grayscale rule."""
    gray = np.asarray(textured(23, 17, seed=5).convert("L"))
    colour = np.asarray(textured(23, 17, seed=6).convert("RGB"))
    if case == "gray_png":
        data = encode(Image.fromarray(gray, mode="L"))
    elif case == "rgb_png":
        data = encode(Image.fromarray(colour, mode="RGB"))
    elif case == "near_gray_rgb_png":  # channels differ by at most 2: grayscale by the rule
        noise = np.random.default_rng(1).integers(0, 3, gray.shape + (3,))
        data = encode(Image.fromarray(np.clip(gray[..., None].astype(int) + noise, 0, 255).astype(np.uint8), mode="RGB"))
    elif case == "exact_gray_rgb_png":
        data = encode(Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB"))
    elif case == "gray_palette_gif":
        data = encode(Image.fromarray(gray, mode="L"), "GIF")
    elif case == "colour_palette_gif":
        data = encode(Image.fromarray(colour, mode="RGB").quantize(64), "GIF")
    else:  # image data split over many IDAT chunks
        buffer = io.BytesIO()
        Image.fromarray(colour, mode="RGB").save(buffer, "PNG", compress_level=0)
        raw = buffer.getvalue()
        ihdr_end = 8 + 25
        idat_len = int.from_bytes(raw[ihdr_end : ihdr_end + 4], "big")
        payload = raw[ihdr_end + 8 : ihdr_end + 8 + idat_len]
        chunks = b""
        for start in range(0, len(payload), 100):
            part = payload[start : start + 100]
            body = b"IDAT" + part
            chunks += len(part).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
        data = raw[:ihdr_end] + chunks + raw[ihdr_end + 12 + idat_len :]
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded.pixels, _reference_canonical(data))
    assert decoded.pixels.flags["C_CONTIGUOUS"]
    assert decoded.image.mode == decoded.canonical_mode


@pytest.mark.parametrize("size", [0, 1000, 256 * 1024 - 1, 256 * 1024, 256 * 1024 * 3 + 7])
def test_read_file_returns_every_byte(tmp_path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert read_file(str(path)) == data
    with pytest.raises(DecodeFailure) as info:
        read_file(str(tmp_path / "absent"))
    assert info.value.reason == policy.REASON_MISSING
    with pytest.raises(DecodeFailure) as info:
        read_file(str(tmp_path))  # a folder
    assert info.value.reason == policy.REASON_UNREADABLE


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (32, 32)])
def test_pixel_hash_is_the_documented_digest(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    mode = "L" if len(shape) == 2 else "RGB"
    reference = hashlib.blake2b(f"{mode}:{shape[1]}x{shape[0]}:".encode(), digest_size=16)
    reference.update(array.tobytes())
    assert pixel_hash(array) == reference.hexdigest()
    assert pixel_hash(Image.fromarray(array)) == reference.hexdigest()
    # A non-contiguous view of the same pixels hashes alike; twice in a row too (cached header).
    wide = np.zeros((shape[0], shape[1] * 2, *shape[2:]), dtype=np.uint8)
    wide[:, ::2] = array
    assert pixel_hash(wide[:, ::2]) == pixel_hash(array) == reference.hexdigest()


def test_policy_key_names_the_policy_and_the_settings_that_change_results(monkeypatch) -> None:
    base = policy_key(DecodeConfig())
    assert base == policy_key(DecodeConfig()) and len(base) == 16
    # Settings that change what a file decodes to change the key...
    assert policy_key(DecodeConfig(max_pixels=1000)) != base
    assert policy_key(DecodeConfig(gray_tolerance=0)) != base
    assert policy_key(DecodeConfig(background=(0, 0, 0))) != base
    assert policy_key(DecodeConfig(png_compress_level=9)) != base
    # ...the pool's shape and time limits do not (their failures are never cached).
    assert policy_key(DecodeConfig(task_timeout_s=1.0, chunk_size=3, start_method="spawn")) == base
    monkeypatch.setattr(policy, "NORMALISATION_POLICY_VERSION", policy.NORMALISATION_POLICY_VERSION + 1)
    assert policy_key(DecodeConfig()) != base



def test_hashes_and_features_of_an_image_do_not_depend_on_its_batch() -> None:
    """Workers compute these per chunk, and the decode cache mixes facts of different chunks:
    an image's figures must not depend on which images shared its chunk. (With the DCT as one
    product over the whole batch, coefficients rounded differently with the batch size, and
    near-flat images' pHash bits flipped.) Checked at one BLAS thread, as in the workers."""
    from threadpoolctl import threadpool_limits

    from cvops_dagster.imaging.features import pixel_features
    from cvops_dagster.imaging.hashes import low_frequencies, perceptual_hashes

    rng = np.random.default_rng(0)
    flat = (np.full((200, 32, 32), 128) + rng.integers(0, 2, (200, 32, 32))).astype(np.uint8)
    thumbs = np.concatenate([flat, rng.integers(0, 256, (200, 32, 32), dtype=np.uint8)])
    images = [rng.integers(0, 256, (24, 20, 3), dtype=np.uint8) for _ in range(9)] + [flat[0], flat[1]]
    with threadpool_limits(limits=1):
        alone = np.concatenate([low_frequencies(thumbs[i : i + 1]) for i in range(len(thumbs))])
        hashes = np.concatenate([perceptual_hashes(thumbs[i : i + 1])[0] for i in range(len(thumbs))])
        for start, stop in ((0, 400), (3, 131), (17, 18), (5, 260), (100, 357)):
            np.testing.assert_array_equal(low_frequencies(thumbs[start:stop]), alone[start:stop])
            np.testing.assert_array_equal(perceptual_hashes(thumbs[start:stop])[0], hashes[start:stop])
        batch = pixel_features(images)
        for i, image in enumerate(images):
            single = {name: values[0] for name, values in pixel_features([image]).items()}
            assert single == {name: values[i] for name, values in batch.items()}
