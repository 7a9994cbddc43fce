"""`cvops bench cleaning` figures, on a small generated set (timings are not asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cvops_dagster.bench.cleaning import build_sample_files, run_cleaning_benchmark

from tests.unit.rawdata import textured


def test_benchmark_reports_both_rates_and_their_ratios(tmp_path: Path) -> None:
    files = []
    for i in range(24):
        path = tmp_path / ("cat" if i % 2 else "dog") / f"{i}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        textured(24, 24, seed=i).save(path)
        files.append(path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    files.append(tmp_path / "dog" / "broken.png")
    figures = run_cleaning_benchmark(files=files, repeats=1)
    assert figures["files"] == figures["distinct_files"] == 25
    for suffix in ("1_worker", "2_workers"):
        rate = figures[f"cleaning_images_per_s_{suffix}"]
        assert rate > 0
        assert figures[f"ratio_{suffix}"] == pytest.approx(rate / figures["bare_images_per_s"])
        assert 0 < figures[f"decode_share_{suffix}"] <= 1
    assert figures["outcomes"]["clean"] == 24 and figures["outcomes"]["quarantined"] == 1
    assert figures["parent_rss_mb"] > 0


def test_sample_files_at_scale_two_are_two_encodings_of_each_digit(tmp_path: Path) -> None:
    files = build_sample_files(tmp_path, scale=2)
    assert len(files) == 2 * 1797
    first, second = files[0][0], files[1][0]
    assert first.suffix == second.suffix == ".png" and first.read_bytes() != second.read_bytes()
    with Image.open(first) as a, Image.open(second) as b:
        assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError):
        build_sample_files(tmp_path / "x", scale=11)
