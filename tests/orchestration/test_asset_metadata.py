"""What a user sees on the asset pages, through ``materialize(...)``: typed tables instead of JSON,
column schemas and row counts that match the Parquet files written, an existing ``uri`` per
artifact, small thumbnails and plots, owners, code references and descriptions that render as
written."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    LocalFileCodeReference,
    MarkdownMetadataValue,
    PathMetadataValue,
    TableMetadataValue,
    TableSchemaMetadataValue,
    instance_for_test,
    materialize,
)
from PIL import Image

from assets.datasets import cleaned_dataset
from assets.ingestion import raw_images
from assets.metadata import arrow_column_type
from cvops_dagster.definitions import build_definitions, defs
from resources.catalog import ASSET_OWNERS_ENV, DEFAULT_ASSET_OWNERS
from resources.storage import ArtifactStore, ImageSource
from tests.unit.synthetic_datasets import shape_image
from assets.metadata import table_as_mapping

REPO = Path(__file__).resolve().parents[2]
#: An inline PNG in Markdown metadata.
_INLINE_PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def write_batch(landing: Path, batch: str = "b1", per_class: int = 6) -> None:
    """Three classes of small RGB shapes, a broken PNG, an HTML file named .jpg, a label conflict."""
    rng = np.random.default_rng(0)
    for label in ("circle", "hbar", "vbar"):
        folder = landing / batch / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            shape_image(label, (24, 20), "RGB", rng).save(folder / f"{i}.png")
    (landing / batch / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (landing / batch / "hbar" / "page.jpg").write_bytes(b"<html><body>not an image</body></html>")
    shutil.copy(landing / batch / "circle" / "0.png", landing / batch / "vbar" / "conflict.png")
    (landing / batch / "_READY").write_text("")


def _resources(landing: Path, artifacts: Path) -> dict:
    return {"image_source": ImageSource(root=str(landing)), "artifact_store": ArtifactStore(root=str(artifacts))}


def _materialize_dataset(instance: DagsterInstance, landing: Path, artifacts: Path):  # noqa: ANN202
    instance.add_dynamic_partitions("image_batches", ["b1"])
    resources = _resources(landing, artifacts)
    raw = materialize([raw_images], instance=instance, partition_key="b1", resources=resources)
    assert raw.success
    cleaned = materialize([cleaned_dataset, raw_images.to_source_asset()], selection=["cleaned_dataset"], instance=instance, resources=resources)
    assert cleaned.success
    return raw.asset_materializations_for_node("raw_images")[0].metadata, cleaned.asset_materializations_for_node("cleaned_dataset")[0].metadata


@pytest.fixture(scope="module")
def dataset_metadata(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(raw_images metadata, cleaned_dataset metadata, artifact root) of one small batch."""
    root = tmp_path_factory.mktemp("metadata")
    landing, artifacts = root / "landing", root / "artifacts"
    write_batch(landing)
    with instance_for_test() as instance:
        raw, cleaned = _materialize_dataset(instance, landing, artifacts)
    return raw, cleaned, artifacts


def _columns(value: TableMetadataValue) -> dict[str, str]:
    return {c.name: c.type for c in value.schema.columns}


def _rows(value: TableMetadataValue) -> list[dict]:
    return [dict(r.data) for r in value.records]


def _file(value: object) -> Path:
    assert isinstance(value, PathMetadataValue), type(value)
    path = Path(value.path)
    assert path.is_file(), path
    return path


def _assert_column_schema_matches_file(metadata: dict, parquet: Path) -> None:
    """``dagster/column_schema`` names the file's columns, in order, with their types."""
    schema = metadata["dagster/column_schema"]
    assert isinstance(schema, TableSchemaMetadataValue)
    written = pq.read_schema(parquet)
    assert [c.name for c in schema.schema.columns] == written.names
    assert [c.type for c in schema.schema.columns] == [arrow_column_type(f.type) for f in written]
    assert metadata["dagster/row_count"].value == pq.ParquetFile(parquet).metadata.num_rows


def _inline_png(value: object) -> bytes:
    assert isinstance(value, MarkdownMetadataValue), type(value)
    found = _INLINE_PNG.search(value.md_str)
    assert found, value.md_str[:200]
    data = base64.b64decode(found.group(1))
    Image.open(io.BytesIO(data)).verify()
    return data


def test_raw_images_manifest_schema_row_count_uri_and_typed_preview(dataset_metadata) -> None:  # noqa: ANN001
    raw, _, _ = dataset_metadata
    manifest = _file(raw["uri"])
    assert manifest == Path(raw["manifest"].path) and manifest.name == "b1.parquet"
    _assert_column_schema_matches_file(raw, manifest)
    assert raw["dagster/partition_row_count"].value == raw["dagster/row_count"].value == raw["files"].value + raw["rejected"].value
    types = _columns(raw["preview"])
    assert types["size_bytes"] == "int" and types["path"] == "string"
    assert all(isinstance(r["size_bytes"], int) for r in _rows(raw["preview"]) if r["size_bytes"] is not None)
    # The figures cvops status reports keep their keys and JSON types.
    assert table_as_mapping(raw["labels"]) == {"circle": 7, "hbar": 7, "vbar": 7}


def test_cleaned_dataset_tables_schema_and_artifacts(dataset_metadata) -> None:  # noqa: ANN001
    _, cleaned, artifacts = dataset_metadata
    manifest_path = _file(cleaned["uri"])
    assert manifest_path.name == "manifest.parquet" and _file(cleaned["dataset_json"]).name == "dataset.json"
    _assert_column_schema_matches_file(cleaned, manifest_path)
    manifest = pq.read_table(manifest_path).to_pandas()
    assert cleaned["dagster/row_count"].value == len(manifest) == cleaned["input"].value

    per_class = cleaned["per_class"]
    assert isinstance(per_class, TableMetadataValue)
    assert _columns(per_class) == {
        "label": "string", "clean": "int", "train": "int", "val": "int", "test": "int",
        "duplicates": "int", "quarantined": "int", "share": "float",
    }  # fmt: skip
    rows = {r["label"]: r for r in _rows(per_class)}
    clean = manifest[manifest["outcome"] == "clean"]
    assert {k: r["clean"] for k, r in rows.items()} == clean["label"].value_counts().to_dict()
    assert all(r["train"] + r["val"] + r["test"] == r["clean"] for r in rows.values())
    assert abs(sum(r["share"] for r in rows.values()) - 1.0) < 1e-3
    # JSON figures read back by `cvops status --json` stay as they were.
    assert table_as_mapping(cleaned["classes"]) == {k: r["clean"] for k, r in rows.items()}
    assert sum(table_as_mapping(cleaned["splits"]).values()) == cleaned["clean"].value

    reasons = {r["reason"]: r for r in _rows(cleaned["quarantine_by_reason"])}
    assert _columns(cleaned["quarantine_by_reason"])["files"] == "int"
    assert set(reasons) == set(table_as_mapping(cleaned["quarantine_reasons"])) >= {"label_conflict", "format_not_allowed"}
    assert reasons["label_conflict"]["decoded"] == 2 and reasons["format_not_allowed"]["decoded"] == 0
    assert _columns(cleaned["quarantine_examples"])["count"] == "int"
    assert isinstance(cleaned["decode_seconds"].value, float)


def test_cleaned_dataset_thumbnails_are_small_pngs(dataset_metadata) -> None:  # noqa: ANN001
    _, cleaned, _ = dataset_metadata
    samples = _inline_png(cleaned["sample_thumbnails"])
    assert len(samples) < 16_000
    assert "of 3 classes" in cleaned["sample_thumbnails"].md_str
    with Image.open(io.BytesIO(samples)) as image:
        assert image.height < 3 * 40 and image.width < 300  # three rows of 32-pixel cells
    # Only the label conflict decoded among the quarantined files; it is shown, the others listed.
    quarantined = _inline_png(cleaned["quarantine_thumbnails"])
    assert len(quarantined) < 8_000
    assert "1 sample of 1 quarantine reason;" in cleaned["quarantine_thumbnails"].md_str


def test_failing_thumbnails_degrade_to_none_never_a_failed_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import assets.metadata

    def explode(*_: object, **__: object) -> None:
        raise OSError("decoder fell over")

    monkeypatch.setattr(assets.metadata, "class_thumbnails", explode)
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_batch(landing)
    with instance_for_test() as instance:
        _, cleaned = _materialize_dataset(instance, landing, artifacts)
        logs = [r.user_message for r in instance.all_logs(instance.get_runs(limit=1)[0].run_id)]
    assert "sample_thumbnails" not in cleaned and "quarantine_thumbnails" in cleaned
    assert any("no sample_thumbnails: OSError: decoder fell over" in m for m in logs)


def test_every_asset_has_owners_and_a_code_reference() -> None:
    specs = list(defs.resolve_all_asset_specs())
    assert {s.key.to_user_string() for s in specs} >= {"raw_images", "cleaned_dataset", "onnx_runtime"}
    for spec in specs:
        assert spec.owners == [DEFAULT_ASSET_OWNERS], spec.key
        references = spec.metadata["dagster/code_references"].code_references
        assert len(references) == 1 and isinstance(references[0], LocalFileCodeReference)
        source = Path(references[0].file_path)
        assert source.parent == REPO / "assets", source
        # The reference points at the asset's definition.
        lines = source.read_text().splitlines()
        window = "\n".join(lines[references[0].line_number - 1 : references[0].line_number + 60])
        assert f"def {spec.key.to_user_string()}(" in window


def test_owners_and_git_links_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from resources.catalog import asset_owners_from_env, git_source_from_env

    assert asset_owners_from_env({}) == ["team:cvops"]
    assert asset_owners_from_env({ASSET_OWNERS_ENV: " team:vision, ml@example.com ,team:vision"}) == ["team:vision", "ml@example.com"]
    with pytest.raises(ValueError, match=ASSET_OWNERS_ENV):
        asset_owners_from_env({ASSET_OWNERS_ENV: "vision"})
    # Read when the code location loads.
    probe = "from cvops_dagster.definitions import defs; print(sorted({o for s in defs.resolve_all_asset_specs() for o in s.owners}))"
    env = {**__import__("os").environ, ASSET_OWNERS_ENV: "team:vision,ml@example.com"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    assert out.stdout.strip() == "['ml@example.com', 'team:vision']"

    assert git_source_from_env({}) is None
    monkeypatch.setenv("CVOPS_GIT_URL", "https://github.com/org/cvops-dagster.git/")
    source = git_source_from_env()
    assert source is not None and (source.url, source.branch) == ("https://github.com/org/cvops-dagster", "main")
    graph = build_definitions().resolve_asset_graph()
    reference = graph.get(AssetKey("raw_images")).metadata["dagster/code_references"].code_references[0]
    assert re.fullmatch(r"https://github\.com/org/cvops-dagster/tree/main/assets/ingestion\.py#L\d+", reference.url)


def _descriptions() -> dict[str, str]:
    graph = defs.resolve_asset_graph()
    out = {k.to_user_string(): graph.get(k).description or "" for k in graph.get_all_asset_keys()}
    out.update({k.name: graph.get_check_spec(k).description or "" for k in graph.asset_check_keys})
    out.update({j.name: j.description or "" for j in defs.resolve_all_job_defs() if not j.name.startswith("__")})
    return out


def test_descriptions_render_as_written() -> None:
    markdown_it = pytest.importorskip("markdown_it")
    descriptions = _descriptions()
    assert "`images/<sha256>.<ext>`" in descriptions["raw_images"]
    renderer = markdown_it.MarkdownIt("commonmark")
    for name, text in descriptions.items():
        assert text, f"{name} has no description"
        # Outside code spans no angle bracket is left for the UI to take for an HTML tag.
        assert not re.search(r"[<>]", re.sub(r"`[^`]*`", "", text)), name
        html = renderer.render(text)
        visible = re.sub(r"<[^>]+>", "", html).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&quot;", '"')
        assert visible.split() == text.replace("`", "").split(), name
    assert "&lt;sha256&gt;.&lt;ext&gt;" in renderer.render(descriptions["raw_images"])


TINY = {
    "ops": {
        "hpo_study": {"config": {"n_trials": 3, "max_epochs": 2}},
        "trained_model": {"config": {"max_epochs": 3, "patience": 3, "accuracy_floor": 0.0}},
    }
}


@pytest.mark.slow
def test_training_and_serving_metadata_through_the_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_batch(landing, per_class=30)
    monkeypatch.setenv("CVOPS_LANDING", str(landing))
    monkeypatch.setenv("CVOPS_ARTIFACT_ROOT", str(artifacts))
    graph_defs = build_definitions()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("image_batches", ["b1"])
        assert graph_defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key="b1").success
        lifecycle = graph_defs.resolve_job_def("lifecycle_job")
        assert lifecycle.execute_in_process(instance=instance, run_config=TINY).success
        latest = {
            name: instance.get_latest_materialization_event(AssetKey(name)).asset_materialization.metadata
            for name in ("hpo_study", "trained_model", "production_model", "onnx_runtime")
        }
        # A second gate run sees the promotion the first run published in its history table.
        gate = [AssetKey("production_model"), AssetKey("onnx_runtime")]
        assert lifecycle.execute_in_process(instance=instance, asset_selection=gate).success
        again = instance.get_latest_materialization_event(AssetKey("production_model")).asset_materialization.metadata

    study = latest["hpo_study"]
    trials = study["trials"]
    assert _columns(trials)["number"] == "int" and _columns(trials)["value"] == "float" and _columns(trials)["epochs"] == "int"
    assert [r["number"] for r in _rows(trials)] == list(range(study["trials_complete"].value + study["trials_pruned"].value + study["trials_failed"].value))
    history_png = _inline_png(study["optimization_history"])
    assert len(history_png) < 20_000
    (tmp_path / "history.png").write_bytes(history_png)
    assert _file(study["uri"]).name == "optuna.db"
    assert study["best_params"].data  # read back by trained_model: still JSON

    trained = latest["trained_model"]
    assert _columns(trained["per_class"]) == {"label": "string", "precision": "float", "recall": "float", "support": "int"}
    assert {r["label"] for r in _rows(trained["per_class"])} == {"circle", "hbar", "vbar"}
    assert sum(r["support"] for r in _rows(trained["per_class"])) > 0
    accuracy = trained["test_accuracy"].value
    assert isinstance(accuracy, float) and accuracy == float(f"{accuracy:.4g}")
    assert _file(trained["uri"]).name == "model.safetensors" and _file(trained["model_card"]).name == "model_card.json"
    for plot in ("confusion_matrix", "learning_curves"):
        assert len(_inline_png(trained[plot])) < 20_000, plot

    production = latest["production_model"]
    assert _columns(production["slices"])["accuracy"] == "float" and _columns(production["slices"])["n"] == "int"
    assert {(r["model"], r["slice"]) for r in _rows(production["slices"])} >= {("challenger", "all")}
    assert _file(production["uri"]).name == f"{production['decision_id'].value}.json"
    history = _rows(again["history"])
    assert _columns(again["history"])["accuracy"] == "float"
    assert [(r["event"], r["model_id"]) for r in history] == [("promoted", production["model_id"].value)]
    assert history[0]["accuracy"] == pytest.approx(production["test_accuracy"].value, abs=1e-3)
    champion = {r["slice"] for r in _rows(again["slices"]) if r["model"] == "champion"}
    assert champion >= {"all", "previous"}
    runtime = latest["onnx_runtime"]
    assert _file(runtime["uri"]) == Path(runtime["path"].path) and runtime["uri"].path.endswith(".onnx")
    assert _file(runtime["serving_pointer"]).name == "serving.json"
