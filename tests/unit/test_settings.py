"""Where a command finds its project, instance, landing zone and artifact root (core/settings.py,
core/instance.py): pure functions of the environment and the current folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvops_dagster.core import settings
from cvops_dagster.core.instance import InstanceNotFoundError, ensure_dagster_home, existing_dagster_home

REPO_WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"

OTHER_WORKSPACE = """\
load_from:
  - python_module:
      module_name: someone_else.definitions
"""


def make_project(folder: Path, text: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "workspace.yaml").write_text(text if text is not None else REPO_WORKSPACE.read_text())
    return folder


def test_the_repository_workspace_loads_the_definitions() -> None:
    assert settings.loads_cvops_definitions(REPO_WORKSPACE)


@pytest.mark.parametrize(
    "text",
    [
        "load_from:\n  - python_module: cvops_dagster.definitions\n",
        "load_from:\n  - python_module:\n      module_name: cvops_dagster.definitions\n      location_name: x\n",
        "load_from:\n  - python_package:\n      package_name: cvops_dagster.definitions\n",
    ],
)
def test_workspace_forms_that_load_the_definitions(tmp_path: Path, text: str) -> None:
    make_project(tmp_path, text)
    assert settings.find_project(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("text", [OTHER_WORKSPACE, "", "load_from: [", "just text\n", "load_from:\n  - 3\n"])
def test_a_workspace_not_loading_the_definitions_makes_no_project(tmp_path: Path, text: str) -> None:
    make_project(tmp_path, text)
    assert settings.find_project(tmp_path) is None


def test_walk_up_finds_the_nearest_project(tmp_path: Path) -> None:
    outer = make_project(tmp_path / "outer")
    inner = make_project(outer / "a" / "inner")
    deep = inner / "b" / "c"
    deep.mkdir(parents=True)
    assert settings.project_root({}, cwd=deep) == inner.resolve()
    assert settings.project_root({}, cwd=inner) == inner.resolve()  # the folder itself counts
    assert settings.project_root({}, cwd=outer / "a") == outer.resolve()


def test_walk_up_skips_a_workspace_of_other_code(tmp_path: Path) -> None:
    outer = make_project(tmp_path / "outer")
    make_project(outer / "other", OTHER_WORKSPACE)
    (outer / "other" / "sub").mkdir()
    assert settings.project_root({}, cwd=outer / "other" / "sub") == outer.resolve()


def test_no_project_falls_back_to_the_current_folder(tmp_path: Path) -> None:
    assert settings.project_root({}, cwd=tmp_path) is None
    assert settings.landing_root({}, cwd=tmp_path) == "./landing"
    assert settings.artifact_root({}, cwd=tmp_path) == "./.cvops"
    assert settings.dagster_home({}, cwd=tmp_path) == (tmp_path / ".dagster_home").resolve()
    roots = settings.resolve_roots({}, cwd=tmp_path)
    assert roots.project is None and roots.project_source == "none"
    assert roots.landing == str((tmp_path / "landing").resolve()) and roots.landing_source == "current folder"


def test_defaults_are_project_relative_from_any_subfolder(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p").resolve()
    sub = project / "x" / "y"
    sub.mkdir(parents=True)
    assert settings.landing_root({}, cwd=sub) == str(project / "landing")
    assert settings.artifact_root({}, cwd=sub) == str(project / ".cvops")
    assert settings.dagster_home({}, cwd=sub) == project / ".dagster_home"
    roots = settings.resolve_roots({}, cwd=sub)
    assert (roots.project, roots.project_source) == (project, "workspace.yaml")
    assert (roots.dagster_home, roots.dagster_home_source) == (project / ".dagster_home", "project")
    assert (roots.artifacts, roots.artifacts_source) == (str(project / ".cvops"), "project")


def test_cvops_home_wins_over_the_walk_up(tmp_path: Path) -> None:
    here = make_project(tmp_path / "here")
    there = (tmp_path / "there").resolve()
    there.mkdir()  # a folder is enough: no workspace.yaml required
    env = {"CVOPS_HOME": str(there)}
    assert settings.project_root(env, cwd=here) == there
    roots = settings.resolve_roots(env, cwd=here)
    assert roots.project_source == "$CVOPS_HOME"
    assert roots.dagster_home == there / ".dagster_home" and roots.landing == str(there / "landing")
    # Relative to the current folder, like every path variable.
    assert settings.project_root({"CVOPS_HOME": "../there"}, cwd=here) == there


def test_cvops_home_must_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for value in (str(tmp_path / "missing"), str(tmp_path / "file")):
        with pytest.raises(settings.ProjectError, match="CVOPS_HOME=.* is not a folder"):
            settings.project_root({"CVOPS_HOME": value}, cwd=tmp_path)
    assert not (tmp_path / "missing").exists()


def test_environment_variables_win_over_project_defaults(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    env = {
        "CVOPS_LANDING": "s3://bucket/in/",
        "CVOPS_ARTIFACT_ROOT": "rel/art",
        "DAGSTER_HOME": "rel/home",
        "CVOPS_HOME": str(project),
    }
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert settings.landing_root(env, cwd=cwd) == "s3://bucket/in/"
    assert settings.artifact_root(env, cwd=cwd) == "rel/art"  # raw: relative to the current folder
    assert settings.dagster_home(env, cwd=cwd) == (cwd / "rel" / "home").resolve()
    roots = settings.resolve_roots(env, cwd=cwd)
    assert roots.landing == "s3://bucket/in" and roots.landing_source == "$CVOPS_LANDING"
    assert roots.artifacts == str((cwd / "rel" / "art").resolve()) and roots.artifacts_source == "$CVOPS_ARTIFACT_ROOT"
    assert roots.dagster_home_source == "$DAGSTER_HOME"


def test_process_environment_and_folder_are_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p").resolve()
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    for name in ("CVOPS_HOME", "CVOPS_LANDING", "CVOPS_ARTIFACT_ROOT", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert settings.project_root() == project
    assert settings.landing_root() == str(project / "landing")
    monkeypatch.setenv("CVOPS_LANDING", "mine")
    assert settings.normalize_root(settings.landing_root()) == str(project / "sub" / "mine")


def test_existing_dagster_home_never_creates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("CVOPS_HOME", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InstanceNotFoundError, match=r"no Dagster instance at .*\.dagster_home: run `cvops demo`.*CVOPS_HOME"):
        existing_dagster_home()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".dagster_home").mkdir()
    with pytest.raises(InstanceNotFoundError, match="no dagster.yaml"):
        existing_dagster_home()
    assert list((tmp_path / ".dagster_home").iterdir()) == []

    made = ensure_dagster_home()  # a command that writes creates it
    assert made == (tmp_path / ".dagster_home").resolve() and (made / "dagster.yaml").is_file()
    monkeypatch.delenv("DAGSTER_HOME")
    assert existing_dagster_home() == made


def test_ensure_dagster_home_uses_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p").resolve()
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    for name in ("CVOPS_HOME", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert ensure_dagster_home() == project / ".dagster_home"
    assert not (project / "sub" / ".dagster_home").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("study.db", "/work/p/study.db"),
        ("runs/journal.log", "/work/p/runs/journal.log"),
        ("/abs/study.db", "/abs/study.db"),
        ("sqlite:///study.db", "sqlite:////work/p/study.db"),
        ("sqlite:////abs/study.db", "sqlite:////abs/study.db"),
        ("sqlite://", "sqlite://"),
        ("postgresql://u:p@127.0.0.1:5432/optuna", "postgresql://u:p@127.0.0.1:5432/optuna"),
    ],
)
def test_a_relative_optuna_storage_is_made_absolute(url: str, expected: str) -> None:
    assert settings.absolute_optuna_storage(url, cwd=Path("/work/p")) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {"new_data", "drift"}),
        ("", {"new_data", "drift"}),
        ("drift", {"drift"}),
        (" new_data , drift ", {"new_data", "drift"}),
        ("NEW_DATA", {"new_data"}),
        ("none", set()),
    ],
)
def test_retrain_triggers(value: str | None, expected: set[str]) -> None:
    environ = {} if value is None else {settings.RETRAIN_ON_ENV: value}
    assert settings.retrain_triggers(environ) == expected


def test_an_unknown_retrain_trigger_names_the_variable() -> None:
    with pytest.raises(ValueError, match="CVOPS_RETRAIN_ON.*'weekly'"):
        settings.retrain_triggers({settings.RETRAIN_ON_ENV: "drift,weekly"})


def test_retrain_run_config_path() -> None:
    assert settings.retrain_run_config_path({}) is None
    assert settings.retrain_run_config_path({settings.RETRAIN_CONFIG_ENV: " /x/retrain.yaml "}) == "/x/retrain.yaml"
