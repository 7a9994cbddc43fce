"""FiftyOne's bundled MongoDB starts on a fresh install and can hold a dataset."""

from __future__ import annotations

import uuid
from pathlib import Path

from PIL import Image


def test_fiftyone_can_create_a_dataset(tmp_path: Path) -> None:
    import fiftyone as fo

    image = tmp_path / "one.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(image)
    name = f"cvops-test-{uuid.uuid4().hex[:8]}"
    dataset = fo.Dataset(name)
    try:
        dataset.add_sample(fo.Sample(filepath=str(image), ground_truth=fo.Classification(label="red")))
        assert name in fo.list_datasets()
        assert dataset.count("ground_truth") == 1
        assert dataset.first().ground_truth.label == "red"
    finally:
        dataset.delete()
    assert name not in fo.list_datasets()
