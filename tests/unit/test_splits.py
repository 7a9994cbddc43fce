"""Hash-based splits: deterministic, stable, stratified in expectation; content versions."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from cvops_dagster.datasets.splits import SplitConfig, assign_split, assign_splits, dataset_version


def _ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_split_depends_only_on_id_and_label() -> None:
    ids = _ids(200)
    first = assign_splits(ids, ["cat"] * 200)
    again = [assign_split(i, "cat") for i in reversed(ids)][::-1]
    assert first == again


@pytest.mark.parametrize("label", ["0", "7", "dog"])
def test_each_class_gets_the_configured_proportions(label: str) -> None:
    counts = Counter(assign_splits(_ids(5000, label), [label] * 5000))
    assert counts["train"] / 5000 == pytest.approx(0.8, abs=0.025)
    assert counts["val"] / 5000 == pytest.approx(0.1, abs=0.02)
    assert counts["test"] / 5000 == pytest.approx(0.1, abs=0.02)


def test_adding_samples_never_moves_existing_ones() -> None:
    old = _ids(300)
    before = dict(zip(old, assign_splits(old, ["a"] * 300), strict=True))
    grown = old + _ids(300, "new")
    after = dict(zip(grown, assign_splits(grown, ["a"] * 600), strict=True))
    assert all(after[i] == before[i] for i in old)


def test_custom_fractions_and_validation() -> None:
    config = SplitConfig(train=0.5, val=0.5, test=0.0)
    assert set(assign_splits(_ids(300), ["x"] * 300, config)) == {"train", "val"}
    with pytest.raises(ValueError):
        SplitConfig(train=0.9, val=0.2, test=0.1)


def test_version_is_order_independent_and_content_sensitive() -> None:
    rows = [("a", "cat", "train"), ("b", "dog", "val"), ("c", "cat", "test")]
    assert dataset_version(rows) == dataset_version(list(reversed(rows)))
    assert dataset_version(rows) != dataset_version([*rows[:2], ("c", "dog", "test")])
    assert dataset_version(rows) != dataset_version(rows[:2])
    assert len(dataset_version(rows)) == 16


@pytest.mark.parametrize(
    "config",
    [
        SplitConfig(),
        SplitConfig(train=0.5, val=0.25, test=0.25, salt="other"),
        SplitConfig(train=1.0, val=0.0, test=0.0),
    ],
)
def test_batch_assignment_equals_one_by_one(config: SplitConfig) -> None:
    ids = _ids(3000, "batch")
    labels = [str(i % 7) for i in range(3000)]
    one_by_one = [assign_split(i, lab, config) for i, lab in zip(ids, labels, strict=True)]
    assert assign_splits(ids, labels, config) == one_by_one
    assert assign_splits([], [], config) == []


def test_version_is_the_documented_hash_of_the_sorted_rows() -> None:
    rows = [("b", "dög", "val", "canonical/2.png"), ("a", "cat", "train", "canonical/1.png")]
    text = "mode=L" + "a\tcat\ttrain\tcanonical/1.png\n" + "b\tdög\tval\tcanonical/2.png\n"
    expected = hashlib.sha256(text.encode())
    assert dataset_version(rows, context="mode=L") == expected.hexdigest()[:16]
