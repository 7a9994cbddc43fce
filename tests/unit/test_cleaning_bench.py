"""`cvops bench cleaning`: its sets and figures, on a small run (timings are never asserted)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cvops_dagster.bench import cleaning as bench
from cvops_dagster.bench.cleaning import PHOTO_SOURCES, build_photo_files, build_sample_files, run_cleaning_benchmark
from cvops_dagster.core.storage import ArtifactStorage

SMALL = {"digits": 20, "large_count": 60, "incremental_base": 50, "incremental_new": 10, "repeats": 1}


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    return run_cleaning_benchmark(**SMALL)


def _positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_set_reports_rates_and_ratios_computed_from_its_timings(figures: dict[str, Any]) -> None:
    expected_files = {"sample": 20, "tenx": 200, "large": 60}
    for name, files in expected_files.items():
        assert figures[f"{name}_files"] == figures[f"{name}_distinct_files"] == files
        bare = figures[f"{name}_bare_images_per_s"]
        assert _positive(bare) and bare == pytest.approx(files / figures[f"{name}_bare_seconds"])
        for suffix in ("1_worker", "2_workers"):
            seconds = figures[f"{name}_cleaning_seconds_{suffix}"]
            rate = figures[f"{name}_cleaning_images_per_s_{suffix}"]
            assert _positive(seconds) and rate == pytest.approx(files / seconds)
            assert _positive(figures[f"{name}_ratio_{suffix}"])
            assert figures[f"{name}_ratio_{suffix}"] == pytest.approx(rate / bare)
            assert figures[f"{name}_ratio_{suffix}"] == pytest.approx(figures[f"{name}_bare_seconds"] / seconds)
        outcomes = figures[f"{name}_outcomes"]
        assert outcomes["clean"] + outcomes["duplicates"] + outcomes["quarantined"] == files
    # Each digit in ten encodings: one clean sample per digit, the other nine duplicates.
    assert figures["tenx_outcomes"]["clean"] == 20 and figures["tenx_outcomes"]["duplicates"] == 180
    assert set(figures["large_formats"]) == {"jpg", "png"} and sum(figures["large_formats"].values()) == 60
    assert _positive(figures["parent_rss_mb"]) and _positive(figures["prepare_seconds"])
    json.dumps(figures)  # what `--json` prints


def test_incremental_case_cleans_the_new_batch_over_the_base_and_reports_the_speedup(figures: dict[str, Any]) -> None:
    assert figures["incremental_base_files"] == 50 and figures["incremental_new_files"] == 10
    assert figures["incremental_workers"] == 2
    full, incremental = figures["incremental_full_seconds"], figures["incremental_seconds"]
    assert _positive(full) and _positive(incremental)
    assert figures["incremental_speedup"] == pytest.approx(full / incremental)
    outcomes = figures["incremental_outcomes"]
    assert outcomes["clean"] + outcomes["duplicates"] + outcomes["quarantined"] == 60


def test_photo_set_is_colour_jpeg_and_png_of_256_to_512_pixels(tmp_path: Path) -> None:
    files = build_photo_files(tmp_path, 0, 40, seed=0, jobs=2)
    assert len(files) == 40 and {label for _, label in files} <= set(PHOTO_SOURCES)
    formats: Counter[str] = Counter()
    for path, label in files:
        assert path.parent.name == label
        with Image.open(path) as image:
            formats[image.format] += 1
            assert image.mode == "RGB"
            assert all(256 <= side <= 512 for side in image.size)
            pixels = np.asarray(image, dtype=np.int16)
        # Colour, not grey stored as RGB: the channels differ somewhere.
        assert np.abs(pixels[..., 0] - pixels[..., 1]).mean() > 1 or np.abs(pixels[..., 1] - pixels[..., 2]).mean() > 1
    assert set(formats) == {"JPEG", "PNG"}
    # The same index gives the same file, built alone or in another split of the work.
    again = build_photo_files(tmp_path / "again", 10, 12, seed=0, jobs=1)
    assert [p.read_bytes() for p, _ in again] == [p.read_bytes() for p, _ in files[10:12]]
    assert build_photo_files(tmp_path / "other", 10, 11, seed=1)[0][0].read_bytes() != files[10][0].read_bytes()


def test_sample_files_at_scale_two_are_two_encodings_of_each_digit(tmp_path: Path) -> None:
    files = build_sample_files(tmp_path, scale=2)
    assert len(files) == 2 * 1797
    first, second = files[0][0], files[1][0]
    assert first.suffix == second.suffix == ".png" and first.read_bytes() != second.read_bytes()
    with Image.open(first) as a, Image.open(second) as b:
        assert a.tobytes() == b.tobytes()
    assert len(build_sample_files(tmp_path / "few", scale=10, limit=3)) == 30
    with pytest.raises(ValueError):
        build_sample_files(tmp_path / "x", scale=11)


def test_a_run_in_a_storage_copy_leaves_the_original_as_it_was(tmp_path: Path) -> None:
    source = ArtifactStorage(str(tmp_path / "source"))
    _, key = source.write_content_addressed("images", b"raw bytes", "png")
    source.write_bytes("manifests/raw/b.parquet", b"manifest")
    source.write_bytes("cache/entry", b"cached")
    fresh = bench._copy_storage(source, tmp_path / "fresh")
    assert fresh.list() == [key, "manifests/raw/b.parquet"]  # what ingestion wrote, nothing else
    fresh.write_bytes(key, b"changed")
    everything = bench._copy_storage(source, tmp_path / "all", everything=True)
    assert everything.list() == source.list()
    with open(everything.local_path("cache/entry"), "ab") as f:  # a writer that appends in place
        f.write(b" more")
    assert source.read_bytes(key) == b"raw bytes" and source.read_bytes("cache/entry") == b"cached"


def test_unknown_set_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown benchmark sets"):
        run_cleaning_benchmark(sets=("tenx", "huge"))


def test_cli_passes_quick_and_explicit_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cvops_dagster import cli

    calls: list[dict[str, Any]] = []

    def fake(**options: Any) -> dict[str, Any]:
        calls.append(options)
        return {"tenx_ratio_1_worker": 1.0}

    monkeypatch.setattr(bench, "run_cleaning_benchmark", fake)
    assert cli.main(["bench", "cleaning", "--quick", "--large-count", "7", "--sets", "large,incremental", "--json"]) == 0
    assert calls[-1] == {**bench.QUICK, "large_count": 7, "sets": ("large", "incremental")}
    assert json.loads(capsys.readouterr().out) == {"tenx_ratio_1_worker": 1.0}
    assert cli.main(["bench", "cleaning", "--repeats", "2"]) == 0
    assert calls[-1] == {"repeats": 2}
