"""Safe decoding and normalisation: each bad input gets its reason, odd modes their form."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
import zlib
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvops_dagster.imaging import decoding
from cvops_dagster.imaging.decoding import DecodeConfig, DecodeFailure, decode_image, decode_pool, sniff_format
from cvops_dagster.imaging.hashes import pixel_hash

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
        ("zero_byte", b"", decoding.REASON_EMPTY),
        ("text_renamed_png", b"this is a text file, not a picture\n" * 4, decoding.REASON_FORMAT),
        ("truncated_jpeg", jpeg[: len(jpeg) // 2], decoding.REASON_TRUNCATED),
        ("truncated_png", png[: len(png) // 2], decoding.REASON_TRUNCATED),
        ("png_bad_crc", _bad_crc_png(), decoding.REASON_CHECKSUM),
        ("pixel_bomb", _bomb_png(), decoding.REASON_BOMB),
        ("pcx_renamed_jpg", encode(textured(16, 16, seed=4), "PCX"), decoding.REASON_FORMAT),
        ("ppm_renamed_jpg", encode(textured(16, 16, seed=5), "PPM"), decoding.REASON_FORMAT),
        ("ico_renamed_jpg", encode(textured(16, 16, seed=6), "ICO"), decoding.REASON_FORMAT),
    ]


@pytest.mark.parametrize(("name", "data", "reason"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_refused_with_its_reason(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(DecodeFailure) as caught:
        decode_image(data)
    assert caught.value.reason == reason, caught.value.detail


def test_bomb_pillow_would_accept_is_refused_by_the_lower_limit() -> None:
    data = encode(Image.new("L", (200, 200), 7))
    assert decode_image(data).image.size == (200, 200)
    with pytest.raises(DecodeFailure) as caught:
        decode_image(data, DecodeConfig(max_pixels=10_000))
    assert caught.value.reason == decoding.REASON_BOMB


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


# ------------------------------------------------------------------ worker pool


def _write_items(tmp_path, named: dict[str, bytes]) -> list[tuple[str, str]]:
    items = []
    for key, data in named.items():
        path = tmp_path / f"{key}.bin"
        path.write_bytes(data)
        items.append((key, str(path)))
    return items


def _faulty(key: str) -> None:
    if key == "hang":
        time.sleep(60)
    if key == "crash":
        os._exit(7)


def test_pool_quarantines_hung_and_crashed_files_and_carries_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(decoding, "_ITEM_HOOK", _faulty)  # inherited by forked workers
    good = {f"good{i}": encode(textured(12, 12, seed=20 + i)) for i in range(10)}
    named = {**dict(list(good.items())[:5]), "hang": good["good0"], "crash": good["good1"], **dict(list(good.items())[5:])}
    config = DecodeConfig(start_method="fork", task_timeout_s=1.0, chunk_size=4)
    started = time.monotonic()
    output = decode_pool(_write_items(tmp_path, named), tmp_path / "out", config, workers=2)
    frame, phash, compare, stats = output.frame(), output.phash, output.compare, output.stats
    assert time.monotonic() - started < 30
    by_key = frame.set_index("key")
    assert by_key.loc["hang", "reason"] == decoding.REASON_TIMEOUT
    assert by_key.loc["crash", "reason"] == decoding.REASON_CRASH
    assert "code 7" in by_key.loc["crash", "reason_detail"]
    assert by_key.loc[list(good), "ok"].all()
    assert list(frame["key"]) == list(named)  # input order
    assert stats.timeouts == 1 and stats.crashes == 1
    assert len(phash) == len(compare) == len(named)


def test_pool_memory_limit_quarantines_the_file(tmp_path) -> None:
    big = encode(Image.new("RGB", (5000, 5000), (10, 20, 30)), compress_level=1)  # 75 MB decoded
    named = {"big": big, "small": encode(textured(12, 12, seed=30))}
    config = DecodeConfig(memory_limit_bytes=40 * 1024**2)
    frame = decode_pool(_write_items(tmp_path, named), tmp_path / "out", config, workers=1).frame()
    by_key = frame.set_index("key")
    assert by_key.loc["big", "reason"] == decoding.REASON_MEMORY
    assert bool(by_key.loc["small", "ok"])


def test_pool_writes_canonical_pngs_named_by_their_hash(tmp_path) -> None:
    import hashlib

    named = {"a": encode(textured(12, 12, seed=31), "BMP"), "b": encode(textured(12, 12, seed=32, mode="L"))}
    config = DecodeConfig(start_method="forkserver")  # the other start method works too
    frame = decode_pool(_write_items(tmp_path, named), tmp_path / "out", config, workers=1).frame()
    assert frame["ok"].all()
    for sha in frame["canonical_sha"]:
        data = (tmp_path / "out" / f"{sha}.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
        assert Image.open(io.BytesIO(data)).mode in ("L", "RGB")


def test_worker_hanging_at_start_is_replaced_without_blaming_a_file(tmp_path, monkeypatch) -> None:
    flag = tmp_path / "hung-once"
    real_init = decoding._init_worker

    def hang_first_time(config: DecodeConfig) -> None:
        if not flag.exists():
            flag.write_text("x")
            time.sleep(60)
        real_init(config)

    monkeypatch.setattr(decoding, "_init_worker", hang_first_time)  # inherited by forked workers
    named = {f"f{i}": encode(textured(10, 10, seed=40 + i)) for i in range(5)}
    config = DecodeConfig(start_method="fork", task_timeout_s=1.0)
    output = decode_pool(_write_items(tmp_path, named), tmp_path / "out", config, workers=1)
    frame, stats = output.frame(), output.stats
    assert frame["ok"].all()
    assert stats.crashes == 1 and stats.restarts == 1


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
def test_plain_png_fast_path_matches_pillows_png_plugin(name: str, data: bytes, monkeypatch) -> None:
    used: list[bool] = []
    real = decoding._decode_plain_png

    def spy(*args):
        result = real(*args)
        used.append(result is not None)
        return result

    monkeypatch.setattr(decoding, "_decode_plain_png", spy)
    decoded = decode_image(data)
    assert used == [True]
    with Image.open(io.BytesIO(data)) as reference:
        expected = decoding.normalise_mode(reference.convert(reference.mode))
    assert decoded.image.mode == expected.mode
    assert decoded.image.tobytes() == expected.tobytes()
    assert decoded.passthrough == (expected.mode == Image.open(io.BytesIO(data)).mode)
    assert (decoded.format, decoded.orientation, decoded.animated) == ("PNG", 1, False)


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
    [("short_stream", decoding.REASON_TRUNCATED), ("corrupt_stream", decoding.REASON_DECODE), ("bad_crc", decoding.REASON_CHECKSUM)],
)
def test_plain_png_fast_path_refuses_damaged_image_data(case: str, reason: str) -> None:
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


def test_pool_can_return_pixels_instead_of_encoding(tmp_path) -> None:
    named = {
        "bmp": encode(textured(12, 12, seed=60), "BMP"),
        "png": encode(textured(12, 12, seed=61, mode="L")),
        "big": encode(textured(64, 64, seed=62), "BMP"),
    }
    frame = decode_pool(
        _write_items(tmp_path, named), tmp_path / "out", DecodeConfig(), workers=1,
        keep_pixels_up_to=12 * 12 * 3, write_passthrough=False,
    ).frame()
    rows = frame.set_index("key")
    assert rows["ok"].all()
    # Small non-canonical image: pixels back, nothing encoded.
    assert pd.isna(rows.loc["bmp", "canonical_sha"])
    np.testing.assert_array_equal(rows.loc["bmp", "pixels"], np.asarray(textured(12, 12, seed=60)))
    # Already canonical: only its hash, no file.
    assert bool(rows.loc["png", "passthrough"]) and rows.loc["png", "pixels"] is None
    assert rows.loc["png", "canonical_sha"] == hashlib.sha256(named["png"]).hexdigest()
    # Larger than the limit: encoded by the worker as before.
    assert rows.loc["big", "pixels"] is None
    assert (tmp_path / "out" / f"{rows.loc['big', 'canonical_sha']}.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{rows.loc['big', 'canonical_sha']}.png"]


def _report_threads(conn: Any) -> None:
    """Child: the worker's numerics set-up and one matrix product, then its thread count."""
    from cvops_dagster.imaging import decoding as decoding_module

    decoding_module._single_threaded_numerics()
    _ = np.ones((64, 64), dtype=np.float32) @ np.ones((64, 64), dtype=np.float32)
    with open("/proc/self/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    conn.send(threads)
    conn.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="thread count read from Linux /proc")
@pytest.mark.parametrize("matmul_in_parent", [False, True])
def test_forked_worker_starts_without_blas_threads(matmul_in_parent: bool) -> None:
    """Forking under single-threaded BLAS leaves the child one thread, even after its
    numerics set-up and a matrix product (spinning BLAS threads slowed first chunks)."""
    import multiprocessing

    from cvops_dagster.imaging import decoding as decoding_module

    if matmul_in_parent:  # BLAS threads already running in the parent
        _ = np.ones((256, 256)) @ np.ones((256, 256))
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    with decoding_module.single_threaded_blas():
        assert decoding_module._FORKED_SINGLE_THREADED is (decoding_module._threadpools() is not None)
        process = ctx.Process(target=_report_threads, args=(child,))
        process.start()
    assert decoding_module._FORKED_SINGLE_THREADED is False
    child.close()
    assert parent.poll(20)
    threads = parent.recv()
    process.join(5)
    assert threads == 1


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
def test_fast_paths_match_pillow_and_the_mode_rule(case: str) -> None:
    """Plain PNGs inflated into arrays and palettes converted straight to L give exactly
    the pixels of Pillow's decode plus the grayscale rule."""
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


def _faults_for_temporaries(conn: Any, tuned: bool) -> None:
    import resource

    from cvops_dagster.imaging import decoding as decoding_module

    if tuned:
        decoding_module._keep_freed_memory()
    from cvops_dagster.imaging.hashes import perceptual_hashes
    from cvops_dagster.imaging.features import pixel_features

    arrays = list(np.random.default_rng(0).integers(0, 256, (256, 32, 32), dtype=np.uint8))
    stack = np.stack(arrays)

    def chunk_work() -> None:  # what a worker computes per 256-image chunk
        pixel_features(arrays)
        perceptual_hashes(stack)

    for _ in range(3):  # warm up
        chunk_work()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        chunk_work()
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    conn.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="glibc malloc tuning is Linux-only")
def test_workers_keep_freed_memory_instead_of_faulting_it_in_again() -> None:
    """In a worker, a chunk's large temporaries reuse freed memory (no page faults per
    allocation); a default process maps each one afresh. Fresh interpreters (spawn), so
    neither starts with malloc settings this test process has accumulated."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    faults = {}
    for tuned in (False, True):
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_faults_for_temporaries, args=(child, tuned))
        process.start()
        child.close()
        assert parent.poll(120)
        faults[tuned] = parent.recv()
        process.join(5)
    assert faults[True] * 10 < faults[False], faults


@pytest.mark.parametrize("size", [0, 1000, decoding._FIRST_READ - 1, decoding._FIRST_READ, decoding._FIRST_READ * 3 + 7])
def test_read_file_returns_every_byte(tmp_path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert decoding._read_file(str(path)) == data
    with pytest.raises(DecodeFailure) as info:
        decoding._read_file(str(tmp_path / "absent"))
    assert info.value.reason == decoding.REASON_MISSING


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


def _children() -> set[int]:
    """Child pids of this process (zombies included: they are listed until reaped)."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids |= {int(pid) for pid in f.read().split()}
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return pids


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="lists child processes through Linux's /proc")
def test_workers_are_reaped_after_the_pool_returns(tmp_path) -> None:
    before = _children()
    named = {f"f{i}": encode(textured(16, 16, seed=90 + i)) for i in range(6)}
    output = decode_pool(_write_items(tmp_path, named), tmp_path / "out", DecodeConfig(), workers=2)
    assert output.ok.all() and output.stats.workers == 2
    workers = _children() - before
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "decode workers left unreaped"


def test_pinned_blas_stays_single_threaded_after_a_pool_block() -> None:
    from cvops_dagster.imaging import decoding as decoding_module

    controller = decoding_module._threadpools()
    if controller is None:
        pytest.skip("threadpoolctl is not installed")
    decoding_module.pin_single_threaded_blas()
    with decoding_module.single_threaded_blas():  # a pool's block: nothing to restore after it
        assert decoding_module._FORKED_SINGLE_THREADED is True
    assert decoding_module._FORKED_SINGLE_THREADED is False
    blas = [info for info in controller.info() if info["user_api"] == "blas"]
    assert blas and all(info["num_threads"] == 1 for info in blas)


def test_read_file_keeps_reading_after_short_reads(tmp_path, monkeypatch) -> None:
    data = bytes(range(256)) * 40
    path = tmp_path / "blob"
    path.write_bytes(data)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 300)))  # a network file system
    assert decoding._read_file(str(path)) == data
