"""`cvops` finds its project from any folder of it, never creates an instance for `status`, and
prints a status people can act on (lifecycle order, rounded figures, checks, next steps)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from cvops_dagster.cli import build_parser
from cvops_dagster.cli.status import AssetView, format_status, key_figures, format_figure, lifecycle_order
from cvops_dagster.core.settings import Roots
from tests.test_cli import cvops

REPO_WORKSPACE = Path(__file__).resolve().parents[1] / "workspace.yaml"
LIFECYCLE = ["raw_images", "cleaned_dataset", "hpo_study", "trained_model", "production_model", "onnx_runtime"]


def asset_lines(stdout: str) -> list[str]:
    """The asset names heading the status lines, in printed order."""
    return [line.split()[0] for line in stdout.splitlines() if line and not line.startswith(" ") and line.split()[0] in LIFECYCLE]


def test_status_from_a_subfolder_and_from_elsewhere_reads_the_project_instance(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO_WORKSPACE, project / "workspace.yaml")
    cvops("seed", cwd=project)
    out = cvops("run", "--select", "raw_images", cwd=project)
    assert "materialized raw_images [batch_003]" in out.stdout
    at_root = json.loads(cvops("status", "--json", cwd=project).stdout)
    assert at_root["raw_images"]["files"] == 1124  # the labelled digits; the production pool is not a batch

    sub = project / "notebooks" / "deeper"
    sub.mkdir(parents=True)
    from_sub = json.loads(cvops("status", "--json", cwd=sub).stdout)
    assert from_sub == at_root
    human = cvops("status", cwd=sub).stdout
    home = (project / ".dagster_home").resolve()
    assert f"instance   {home} (project)" in human
    assert f"project    {project.resolve()} (workspace.yaml)" in human
    assert f"landing    {(project / 'landing').resolve()}" in human
    assert asset_lines(human) == LIFECYCLE
    assert "batches 3 · files 1,124 · rejected 0" in human
    assert "  check check_raw_images_not_empty: passed" in human
    assert re.search(r"cleaned_dataset +not materialized\n  next: `cvops run`", human), human
    assert not (sub / ".dagster_home").exists() and not (project / "notebooks" / ".dagster_home").exists()
    assert list(sub.iterdir()) == []

    # From an unrelated folder, CVOPS_HOME names the project.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert json.loads(cvops("status", "--json", cwd=elsewhere, env={"CVOPS_HOME": str(project)}).stdout) == at_root
    assert f"instance   {home} (project)" in cvops("status", cwd=elsewhere, env={"CVOPS_HOME": str(project)}).stdout
    assert list(elsewhere.iterdir()) == []


def test_status_without_an_instance_fails_clearly_and_creates_nothing(tmp_path: Path) -> None:
    for args in (("status",), ("status", "--json")):
        result = cvops(*args, cwd=tmp_path, check=False)
        assert result.returncode == 1 and result.stdout == ""
        home = (tmp_path / ".dagster_home").resolve()
        assert f"cvops: error: no Dagster instance at {home}: run `cvops demo` (or `cvops run`)" in result.stderr
        assert "DAGSTER_HOME / CVOPS_HOME" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bad_cvops_home_fails_clearly(tmp_path: Path) -> None:
    result = cvops("status", cwd=tmp_path, env={"CVOPS_HOME": str(tmp_path / "nope")}, check=False)
    assert result.returncode == 1
    assert f"cvops: error: CVOPS_HOME={tmp_path / 'nope'} is not a folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ parser


def subparsers() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_every_option_has_help() -> None:
    missing = [
        f"{name} {action.dest}"
        for name, parser in subparsers().items()
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert missing == []


def test_landing_is_offered_only_where_the_landing_zone_is_read() -> None:
    def options(name: str) -> set[str]:
        return {o for a in subparsers()[name]._actions for o in a.option_strings}

    for name in ("seed", "run", "demo", "ui"):
        assert "--landing" in options(name), name
    for name in ("status", "bench", "predict", "rollback"):
        assert "--landing" not in options(name), name
    for name in ("run", "demo", "ui", "bench", "predict", "rollback"):
        assert "--artifacts" in options(name), name
    assert "CVOPS_HOME" in build_parser().description


# --------------------------------------------------------------------------------------- formatter


def test_lifecycle_order_follows_the_graph() -> None:
    from cvops_dagster.definitions import defs

    names = [k.to_user_string() for k in lifecycle_order(defs.resolve_asset_graph())]
    assert names == [*LIFECYCLE, "batch_predictions", "drift_report", "edge_case_review", "review_feedback"]


def test_lifecycle_order_slots_new_assets_in_by_dependency() -> None:
    from dagster import Definitions, asset

    @asset
    def zeta() -> int:
        return 1

    @asset(deps=[zeta])
    def alpha() -> int:
        return 2

    @asset(deps=[alpha])
    def monitor() -> int:
        return 3

    @asset
    def beta() -> int:
        return 4

    graph = Definitions(assets=[monitor, alpha, zeta, beta]).resolve_asset_graph()
    assert [k.to_user_string() for k in lifecycle_order(graph)] == ["beta", "zeta", "alpha", "monitor"]


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.98611111, "0.9861"), (12.3456, "12.35"), (3.2e-06, "3.20e-06"), (123456.7, "123,457"), (1797, "1,797"), (0.0, "0"),
     (True, "yes"), (None, "-"), ("abc", "abc")],
)
def test_figures_are_rounded(value: object, text: str) -> None:
    assert format_figure(value) == text


ROOTS = Roots(
    project=Path("/p"), project_source="workspace.yaml", dagster_home=Path("/p/.dagster_home"), dagster_home_source="project",
    landing="/p/landing", landing_source="project", artifacts="/data/art", artifacts_source="$CVOPS_ARTIFACT_ROOT",
)


def check(passed: bool | None, *, blocking: bool = True, severity: str = "ERROR", **extra: object) -> dict:
    result = {True: "passed", False: "failed", None: "not evaluated"}[passed]
    return {"passed": passed, "result": result, "severity": severity, "blocking": blocking, "run_id": "r1", "partition": None, **extra}


def test_status_text_for_a_failed_blocking_check_and_a_failed_run() -> None:
    views = [
        AssetView("raw_images", {"batches": 2, "files": 10, "rejected": 1, "bytes": 999, "materialized_at": "2026-01-02T03:04:05+00:00"},
                  {"check_raw_images_not_empty": check(True, blocking=False)}, [], partitioned=True),
        AssetView("cleaned_dataset", {"version": "v1", "input": 10, "clean": 3, "duplicates": 0, "quarantined": 7, "mode": "RGB"},
                  {"check_cleaned_dataset_expectations": check(False, metadata={"evaluated": 12, "failed": 2, "failing_expectations": []})},
                  ["raw_images"]),
        AssetView("hpo_study", None, {}, ["cleaned_dataset"], later_run={"run_id": "run-42", "status": "FAILURE"}),
        AssetView("trained_model", {"model_id": "m1", "test_accuracy": 0.912345678, "macro_f1": 0.9, "epochs_trained": 4},
                  {"check_trained_model_accuracy_floor": check(True)}, ["cleaned_dataset", "hpo_study"],
                  later_run={"run_id": "run-43", "status": "FAILURE"}),
        AssetView("monitor", None, {}, []),
    ]
    text = "\n".join(format_status(views, ROOTS))
    assert text.startswith(
        "instance   /p/.dagster_home (project)\nproject    /p (workspace.yaml)\nlanding    /p/landing (project)\n"
        "artifacts  /data/art ($CVOPS_ARTIFACT_ROOT)\n"
    )
    assert [line.split()[0] for line in text.splitlines()[5:] if line and not line.startswith(" ")][:5] == [v.name for v in views]
    assert "raw_images       materialized 2026-01-02 03:04:05 UTC\n  batches 2 · files 10 · rejected 1 · bytes 999" in text
    assert "  check check_raw_images_not_empty: passed" in text
    assert "  check check_cleaned_dataset_expectations: FAILED (ERROR, blocking): evaluated 12, failed 2" in text
    assert (
        "  next: check_cleaned_dataset_expectations failed: fix its cause (its figures are above), then "
        "`cvops run --select 'cleaned_dataset*'`" in text
    )
    # Downstream of a failed blocking check: why it waits, not a second thing to do.
    assert "hpo_study" in text and "  waits: cleaned_dataset's blocking check check_cleaned_dataset_expectations failed (run run-42" in text
    assert "test_accuracy 0.9123" in text and "0.912345678" not in text
    assert "  next: `cvops run` (or `cvops run --select monitor`)" in text
    assert text.endswith("2 assets to act on: see the `next:` lines above")


def test_status_text_for_a_failed_run_and_a_healthy_graph() -> None:
    failed = [AssetView("raw_images", {"batches": 1, "files": 1}, {}, [], partitioned=True),
              AssetView("cleaned_dataset", None, {}, ["raw_images"], later_run={"run_id": "run-7", "status": "FAILURE"})]
    text = "\n".join(format_status(failed))
    assert not text.startswith("instance")
    assert "  next: run run-7 failed: `cvops ui` shows its log; fix the cause, then `cvops run`" in text
    rerun = [AssetView("cleaned_dataset", {"version": "v2"}, {}, [], later_run={"run_id": "run-8", "status": "CANCELED"})]
    assert "run run-8 canceled after this materialization (the figures above are from the one before)" in "\n".join(format_status(rerun))

    empty = [AssetView("raw_images", None, {}, [], partitioned=True)]
    assert "  next: put complete batches in the landing zone (`cvops seed` for the sample), then `cvops run`" in format_status(empty)

    healthy = [AssetView("raw_images", {"batches": 1}, {"c": check(True)}, [], partitioned=True)]
    assert format_status(healthy)[-1] == "every asset is materialized and every check passed"
    partly = [AssetView("raw_images", {"batches": 2}, {"c": check(True, blocking=False, failed_partitions=["b0"])}, [])]
    text = "\n".join(format_status(partly))
    assert "  check c: passed on the latest batch, FAILED in b0" in text and "  next: c failed in b0:" in text


def test_status_text_of_the_production_side() -> None:
    """Drift is a warning with what follows from it, not a `next:` for the user; no production batch
    yet is a note; cleaned_dataset does not wait for review feedback it can build without."""
    warn = check(False, blocking=False, severity="WARN", failed_partitions=["prod_003"])
    views = [
        AssetView("raw_images", {"batches": 1}, {}, [], partitioned=True),
        AssetView("cleaned_dataset", None, {}, ["raw_images", "review_feedback"]),
        AssetView("batch_predictions", None, {}, [], partitioned=True),
        AssetView("drift_report", {"batch_id": "prod_003", "drift": True, "score": 1.0, "threshold": 0.95},
                  {"check_drift_report_within_threshold": warn}, ["batch_predictions"], partitioned=True),
        AssetView("review_feedback", None, {}, ["batch_predictions"]),
    ]  # fmt: skip
    text = "\n".join(format_status(views))
    assert "  warning: check_drift_report_within_threshold in prod_003: drift; drift_retrain_sensor retrains" in text
    assert "next: check_drift_report_within_threshold" not in text
    assert "  note: no production batch yet: put one in <landing>/production/<batch_id>/" in text
    assert re.search(r"cleaned_dataset +not materialized\n  next: `cvops run`", text), text
    assert "batch_id prod_003 · drift yes · score 1 · threshold 0.95" in text
    assert text.endswith("1 asset to act on: see the `next:` lines above")


def test_key_figures_of_an_unknown_asset_are_its_first_plain_ones() -> None:
    figures = {"materialized_at": "t", "drift": 0.123456, "tests": {"a": 1}, "path": "/x", "n": 3, "note": "x" * 80}
    assert key_figures("some_future_asset", figures) == [("drift", "0.1235"), ("n", "3")]
    assert key_figures("onnx_runtime", {"model_id": "m", "int8": {"accepted": False}}) == [("model_id", "m"), ("int8 accepted", "no")]
