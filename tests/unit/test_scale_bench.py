"""`cvops bench scale`: its figures on a tiny run, and its verdicts (timings are never asserted)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from cvops_dagster.bench.scale import GROWTH_TARGET, PEAK_RSS_TARGET_MB, bench_scale, check_added, verdicts
from cvops_dagster.cli import build_parser

SIZES = (40, 120)
NEW = 12


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    return bench_scale(sizes=SIZES, new=NEW, base_batch=40, repeats=1, code_location=False, validate=True)


def _positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_size_reports_the_add_its_steps_and_its_memory(figures: dict[str, Any]) -> None:
    for n in SIZES:
        steps = [figures[f"{step}_seconds_{n}"] for step in ("ingest", "read", "clean")]
        assert all(_positive(value) for value in steps), steps
        assert _positive(figures[f"add_batch_seconds_{n}"]) and sum(steps) <= figures[f"add_batch_seconds_{n}"]
        assert set(figures[f"clean_phases_{n}"]) == {"decode", "dedup", "canonical", "write"}
        assert _positive(figures[f"validate_seconds_{n}"])
        assert _positive(figures[f"peak_rss_mb_{n}"]) and figures[f"peak_rss_mb_{n}"] >= figures[f"rss_before_add_mb_{n}"]
        for step in ("generate", "ingest", "clean"):
            assert _positive(figures[f"base_{step}_seconds_{n}"])
    assert figures["add_batch_growth"] == pytest.approx(figures["add_batch_seconds_120"] / figures["add_batch_seconds_40"])
    assert figures["add_batch_growth_target"] == GROWTH_TARGET and figures["peak_rss_target_mb"] == PEAK_RSS_TARGET_MB
    assert isinstance(figures["add_batch_growth_target_met"], bool) and isinstance(figures["peak_rss_target_met"], bool)
    assert figures["peak_rss_linear_target_met"] is None  # two sizes: one slope, nothing to compare
    json.dumps(figures)  # what `--json` prints


def test_the_new_batch_enters_the_dataset_version_and_only_it_is_decoded(figures: dict[str, Any]) -> None:
    for n, batches in zip(SIZES, (2, 4), strict=True):
        assert figures[f"base_counts_{n}"]["input"] == n and figures[f"add_counts_{n}"]["input"] == n + NEW
        assert figures[f"new_files_{n}"] == figures[f"new_batch_records_{n}"] == NEW
        assert sum(figures[f"new_batch_outcomes_{n}"].values()) == NEW
        assert figures[f"batches_{n}"] == batches  # the base's batches of 40, and the new one
        # The base's files come from the decode cache: only the new batch is decoded.
        assert figures[f"decoded_{n}"] == NEW and figures[f"from_decode_cache_{n}"] == n
    assert figures["version_40"] != figures["version_120"]


def test_check_added_refuses_a_batch_missing_from_the_version() -> None:
    base = {"input": 100}
    good = {"new_files": 10, "new_batch_records": 10, "counts": {"input": 110}, "in_version_batches": True}
    check_added(base, good, 10)
    for change in ({"new_batch_records": 0}, {"counts": {"input": 100}}, {"in_version_batches": False}):
        with pytest.raises(RuntimeError, match="did not enter the dataset version"):
            check_added(base, {**good, **change}, 10)


def test_verdicts_can_fail() -> None:
    sizes = (6000, 60000, 120000)
    met = verdicts(sizes, [2.0, 2.4, 2.9], [300.0, 400.0, 510.0])
    assert met["add_batch_growth"] == pytest.approx(1.45) and met["add_batch_growth_target_met"] is True
    assert met["peak_rss_mb_per_1k_records"] == pytest.approx([100 / 54, 110 / 60])
    assert met["peak_rss_target_met"] is True and met["peak_rss_linear_target_met"] is True
    slow = verdicts(sizes, [2.0, 3.0, 3.1], [300.0, 400.0, 510.0])
    assert slow["add_batch_growth_target_met"] is False
    # Memory growing faster than the manifest, and past 2 GB.
    heavy = verdicts(sizes, [2.0, 2.0, 2.0], [300.0, 400.0, 2100.0])
    assert heavy["peak_rss_linear_target_met"] is False and heavy["peak_rss_target_met"] is False


def test_the_command_line_takes_the_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["bench", "scale", "--scale-sizes", "100,1000", "--scale-new", "10", "--quick"])
    assert args.name == "scale" and args.scale_sizes == (100, 1000) and args.scale_new == 10 and args.quick
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    shown = capsys.readouterr().out
    assert all(option in shown for option in ("--scale-sizes", "--scale-new", "--scale-base-batch"))
