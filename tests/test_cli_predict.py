"""`cvops predict` as a user runs it, in a fresh process, on a published runtime: it stays light
(no torch, Lightning, Dagster or onnx imported), takes folders, and names every bad path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cvops_dagster.core.settings import REVIEW_PREFIX_ENV  # kept: each test has its own review dataset (tests/conftest.py)
from PIL import Image

from cvops_dagster.serving.predictor import Predictor
from tests.unit.onnx_testkit import publish_trained, trained_case

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """An artifact root whose serving pointer names the tiny trained model's runtime."""
    root = tmp_path / "artifacts"
    publish_trained(str(root))
    return root


def _images(folder: Path, indices: range) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(trained_case().test_images[i]).save(path)
        paths.append(path)
    return paths


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVOPS_", "DAGSTER_HOME")) or k == REVIEW_PREFIX_ENV}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_predict_loads_no_torch_lightning_dagster_or_onnx(tmp_path: Path, published: Path) -> None:
    paths = _images(tmp_path / "imgs", range(3))
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from cvops_dagster.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["predict", "--json", "--artifacts", sys.argv[1], *sys.argv[2:]])
        heavy = sorted(m for m in ("torch", "lightning", "torchmetrics", "dagster", "onnx") if m in sys.modules)
        print(json.dumps({"rc": rc, "heavy": heavy, "records": json.loads(out.getvalue())}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(published), *map(str, paths)],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    assert result["heavy"] == []
    expected = Predictor(next(published.rglob("model.onnx"))).predict(paths)
    assert [r["label"] for r in result["records"]] == expected.labels
    assert [r["error"] for r in result["records"]] == [None] * 3


def cvops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvops_dagster.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300,
    )


def test_predict_takes_a_folder_and_reports_every_bad_path(tmp_path: Path, published: Path) -> None:
    batch = tmp_path / "batch"
    good = _images(batch, range(4))
    (batch / "_READY").write_text("")  # a landing-zone batch folder can be given as is
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    single = _images(tmp_path / "other", range(4, 5))[0]
    missing = tmp_path / "missing.png"

    text = cvops("predict", "--artifacts", str(published), str(missing), str(batch), str(single), cwd=tmp_path)
    assert text.returncode == 1
    lines = [line.split("\t") for line in text.stdout.splitlines()]
    assert [line[0] for line in lines] == [*map(str, good), str(single)]
    expected = Predictor(next(published.rglob("model.onnx"))).predict([*good, single])
    assert [line[1] for line in lines] == expected.labels
    errors = text.stderr.splitlines()
    assert f"cvops: {missing}: no such file or directory" in errors
    assert any(e.startswith(f"cvops: {batch / 'broken.png'}: cannot decode image") for e in errors)
    assert errors[-1] == "cvops: error: 2 of 7 paths could not be predicted"
    assert "Traceback" not in text.stderr

    as_json = cvops("predict", "--json", "--artifacts", str(published), str(missing), str(batch), cwd=tmp_path)
    assert as_json.returncode == 1
    records = json.loads(as_json.stdout)
    assert [r["path"] for r in records] == [str(missing), str(batch / "broken.png"), *map(str, good)]
    assert records[0] == {"path": str(missing), "label": None, "confidence": None, "error": "no such file or directory"}
    assert records[1]["error"].startswith("cannot decode image") and records[1]["label"] is None
    assert [r["label"] for r in records[2:]] == expected.labels[:4]
    assert all(r["error"] is None and 0.0 < r["confidence"] <= 1.0 for r in records[2:])


def test_predict_help_says_what_a_folder_contributes() -> None:
    proc = cvops("predict", "--help", cwd=REPO)
    assert proc.returncode == 0
    assert "recursively" in proc.stdout and "hidden" in proc.stdout and "exit status" in proc.stdout


def test_predict_without_a_published_runtime_fails_clearly(tmp_path: Path) -> None:
    proc = cvops("predict", "--artifacts", str(tmp_path / "none"), str(tmp_path / "x.png"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "no production runtime yet" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_refuses_a_runtime_that_is_not_the_pinned_one(tmp_path: Path, published: Path) -> None:
    runtime = next(published.rglob("model.onnx"))
    data = bytearray(runtime.read_bytes())
    data[len(data) // 2] ^= 0x01
    runtime.write_bytes(bytes(data))
    proc = cvops("predict", "--artifacts", str(published), *map(str, _images(tmp_path / "imgs", range(1))), cwd=tmp_path)
    assert proc.returncode == 1
    assert "differs from the expected" in proc.stderr and proc.stdout == ""
