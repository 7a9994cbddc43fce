"""The library's layout: stages import only earlier stages, Dagster stays in its layer, serving
and monitoring stay torch-free, and every module says what it owns."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "cvops_dagster"

#: Lifecycle order: a stage may import itself and the stages before it, never one after it.
STAGES = ("core", "ingestion", "imaging", "datasets", "training", "registry", "serving", "monitoring", "review")
#: The composition root and the command line: the only library code that may import Dagster
#: (``definitions.py`` and the ``cli`` package).
ROOTS = {"definitions", "cli"}
DAGSTER_LAYER = {"dagster", "dagster_aws", "dagster_webserver", "assets", "resources", "sensors"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name an import statement in ``path`` names (and its prefixes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            full = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            full = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in full:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _package_of(path: Path) -> str | None:
    rel = path.relative_to(LIBRARY)
    return rel.parts[0] if len(rel.parts) > 1 else None


LIBRARY_MODULES = sorted(LIBRARY.rglob("*.py"))
STAGE_MODULES = [p for p in LIBRARY_MODULES if _package_of(p) in STAGES]


def _ids(path: Path) -> str:
    return str(path.relative_to(LIBRARY))


def _ids_any(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_stage_is_a_package_with_a_docstring() -> None:
    for stage in (*STAGES, "bench"):
        init = LIBRARY / stage / "__init__.py"
        assert init.exists(), stage
        assert ast.get_docstring(ast.parse(init.read_text())), f"{stage}/__init__.py says nothing of what it owns"


@pytest.mark.parametrize("path", LIBRARY_MODULES, ids=_ids)
def test_module_docstring_says_what_it_owns(path: Path) -> None:
    assert ast.get_docstring(ast.parse(path.read_text())), f"{_ids(path)} has no module docstring"


@pytest.mark.parametrize("path", STAGE_MODULES, ids=_ids)
def test_stage_imports_only_earlier_stages(path: Path) -> None:
    stage = _package_of(path)
    later = {f"cvops_dagster.{s}" for s in STAGES[STAGES.index(stage) + 1 :]}
    imported = imported_modules(path)
    assert not imported & later, f"{_ids(path)} imports a later stage: {sorted(imported & later)}"
    assert "cvops_dagster.bench" not in imported, f"{_ids(path)} imports the benchmarks"
    assert not imported & {f"cvops_dagster.{r}" for r in ROOTS}, f"{_ids(path)} imports a composition root"


def _is_root(path: Path) -> bool:
    rel = path.relative_to(LIBRARY)
    return rel.parts[0] == "cli" or rel.as_posix() == "definitions.py"


@pytest.mark.parametrize("path", [p for p in LIBRARY_MODULES if not _is_root(p)], ids=_ids)
def test_only_definitions_and_cli_import_dagster(path: Path) -> None:
    assert not imported_modules(path) & DAGSTER_LAYER, f"{_ids(path)} imports the Dagster layer"


def test_the_import_scan_can_fail(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom dagster import asset\nfrom cvops_dagster.serving import predictor\n")
    names = imported_modules(probe)
    assert {"dagster", "cvops_dagster.serving", "cvops_dagster.serving.predictor"} <= names
    probe.write_text("import cvops_dagster.review.views as v\n")
    assert "cvops_dagster.review" in imported_modules(probe)


def modules_loaded_by(code: str) -> set[str]:
    """Top-level module names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("stage", ["serving", "monitoring"])
def test_light_stages_import_no_torch(stage: str) -> None:
    modules = sorted(p for p in (LIBRARY / stage).rglob("*.py"))
    code = "\n".join(f"import {'.'.join(p.relative_to(REPO).with_suffix('').parts)}" for p in modules)
    loaded = modules_loaded_by(code)
    assert not loaded & {"torch", "lightning", "torchmetrics"}, f"importing {stage}/ loads {loaded & {'torch', 'lightning'}}"


def test_torch_probe_can_fail() -> None:
    assert "torch" in modules_loaded_by("import cvops_dagster.training.models")


def test_code_location_loads_without_the_training_stack() -> None:
    # Every Dagster step process loads the code location; the cleaning step forks its decode
    # workers from it. torch, Lightning, Optuna and ONNX load only in the steps using them.
    loaded = modules_loaded_by("import cvops_dagster.definitions")
    assert "dagster" in loaded
    assert not loaded & {"torch", "lightning", "optuna", "onnx", "onnxruntime", "sklearn"}


@pytest.mark.parametrize("package", ["assets", "resources", "sensors", "cvops_dagster"])
def test_top_level_packages_resolve_to_this_repository(package: str) -> None:
    module = __import__(package)
    assert Path(module.__file__).resolve().parent == REPO / package


def test_nothing_test_only_ships() -> None:
    shipped = {p.stem for p in LIBRARY_MODULES}
    assert not shipped & {"synthetic_data", "conftest"}


@pytest.mark.parametrize("path", LIBRARY_MODULES + sorted((REPO / "assets").glob("*.py")), ids=_ids_any)
def test_shipped_code_never_imports_tests(path: Path) -> None:
    assert "tests" not in imported_modules(path), f"{path} imports the test suite"
