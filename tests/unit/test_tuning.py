"""Hyperparameter study: pruning, persistence, resume and crash recovery."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.training.tuning import StudyConfig, default_storage_url, make_pruner, open_storage, run_study
from tests.unit.synthetic_datasets import shapes_dataset

SPACE = {"lr": ("float", 1e-3, 2e-2, True), "dropout": ("float", 0.0, 0.3)}
FIXED = {"width": 8, "batch_size": 16}


class PruneTrialOne(optuna.pruners.BasePruner):
    """Deterministically prunes trial number 1 at its first report, nothing else."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1


def config(n_trials: int, pruner: object = "none") -> StudyConfig:
    return StudyConfig(
        n_trials=n_trials, max_epochs=2, num_threads=1, pruner=pruner, search_space=SPACE, fixed_params=FIXED, n_startup_trials=2
    )


@pytest.fixture
def storage(tmp_path: Path) -> ArtifactStorage:
    store = ArtifactStorage(str(tmp_path / "artifacts"))
    shapes_dataset(store, "v1", n_classes=2, per_class=20, size=(12, 12))
    return store


def test_study_prunes_persists_and_reports(storage: ArtifactStorage, tmp_path: Path) -> None:
    url = default_storage_url(tmp_path / "optuna")
    result = run_study(storage, "v1", config(3, PruneTrialOne()), url)
    assert (result.n_complete, result.n_pruned, result.n_failed) == (2, 1, 0)
    assert result.study_name.endswith("v1") and result.storage_url == url
    assert set(result.best_params) == set(SPACE) | set(FIXED)
    assert 0.0 <= result.best_value <= 1.0
    assert len(result.trials) == 3 and result.history_png.startswith(b"\x89PNG")
    # Pruned at its first epoch: fewer epochs than the 3 x 2 an unpruned study consumes.
    assert result.epochs_consumed == 2 + 1 + 2
    # The study is on disk, not in memory.
    reloaded = optuna.load_study(study_name=result.study_name, storage=url)
    assert len(reloaded.trials) == 3


def test_rerun_resumes_and_counts_finished_trials(storage: ArtifactStorage) -> None:
    first = run_study(storage, "v1", config(2), None)  # default: SQLite under the artifact root
    assert first.n_trials_this_run == 2
    assert (Path(storage.root) / "optuna" / "optuna.db").exists()
    second = run_study(storage, "v1", config(3), None)
    assert second.n_trials_this_run == 1 and second.n_complete == 3
    third = run_study(storage, "v1", config(3), None)
    assert third.n_trials_this_run == 0 and third.n_complete == 3
    assert third.best_value == max(second.trials["value"])


def test_trials_left_running_by_a_crash_are_failed(storage: ArtifactStorage, tmp_path: Path) -> None:
    path = str(tmp_path / "journal.log")  # journal-file storage works as well as SQLite
    study = optuna.create_study(study_name="cvops-v1", storage=open_storage(path), direction="maximize")
    study.ask()  # a trial that a crashed worker never finished
    result = run_study(storage, "v1", config(1), path)
    states = [t.state for t in optuna.load_study(study_name="cvops-v1", storage=open_storage(path)).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    assert result.n_failed == 1 and result.n_complete == 1


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_make_pruner(name: str, kind: type) -> None:
    assert isinstance(make_pruner(StudyConfig(pruner=name)), kind)


def test_unknown_pruner_rejected() -> None:
    with pytest.raises(ValueError):
        make_pruner(StudyConfig(pruner="median-ish"))


def test_several_workers_leave_each_others_running_trials_alone(storage: ArtifactStorage, tmp_path: Path) -> None:
    url = default_storage_url(tmp_path / "shared")
    other_worker = optuna.create_study(study_name="cvops-v1", storage=open_storage(url, 60), direction="maximize")
    other_worker.ask()  # another worker's trial, still running (fresh heartbeat window)
    cfg = config(1)
    cfg.single_worker = False
    result = run_study(storage, "v1", cfg, url)
    states = [t.state for t in optuna.load_study(study_name="cvops-v1", storage=url).trials]
    assert states == [TrialState.RUNNING, TrialState.COMPLETE]
    assert result.n_failed == 0
