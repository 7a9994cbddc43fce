"""Hyperparameter study: pruning, persistence, resume and crash recovery."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.training.tuning import StudyConfig, default_storage_url, make_pruner, open_storage, run_study
from tests.unit.storage_kinds import RemoteLikeStorage
from tests.unit.synthetic_datasets import DatasetCache, only_version

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
def storage(tmp_path: Path, cleaned_datasets: DatasetCache) -> ArtifactStorage:
    store = ArtifactStorage(str(tmp_path / "artifacts"))
    cleaned_datasets.shapes(store, n_classes=2, per_class=20, size=(12, 12))
    return store


@pytest.fixture
def version(storage: ArtifactStorage) -> str:
    """The version of the one cleaned dataset in ``storage``."""
    return only_version(storage)


def test_study_prunes_persists_and_reports(storage: ArtifactStorage, version: str, tmp_path: Path) -> None:
    url = default_storage_url(tmp_path / "optuna")
    result = run_study(storage, version, config(3, PruneTrialOne()), url)
    assert (result.n_complete, result.n_pruned, result.n_failed) == (2, 1, 0)
    assert result.study_name.endswith(version) and result.storage_url == url
    assert set(result.best_params) == set(SPACE) | set(FIXED)
    assert 0.0 <= result.best_value <= 1.0
    assert len(result.trials) == 3 and result.history_png.startswith(b"\x89PNG")
    # Pruned at its first epoch: fewer epochs than the 3 x 2 an unpruned study consumes.
    assert result.epochs_consumed == 2 + 1 + 2
    # The study is on disk, not in memory.
    reloaded = optuna.load_study(study_name=result.study_name, storage=url)
    assert len(reloaded.trials) == 3


def test_rerun_resumes_and_counts_finished_trials(storage: ArtifactStorage, version: str) -> None:
    first = run_study(storage, version, config(2), None)  # default: SQLite under the artifact root
    assert first.n_trials_this_run == 2
    assert (Path(storage.root) / "optuna" / "optuna.db").exists()
    second = run_study(storage, version, config(3), None)
    assert second.n_trials_this_run == 1 and second.n_complete == 3
    third = run_study(storage, version, config(3), None)
    assert third.n_trials_this_run == 0 and third.n_complete == 3
    assert third.best_value == max(second.trials["value"])


def test_trials_left_running_by_a_crash_are_failed(storage: ArtifactStorage, version: str, tmp_path: Path) -> None:
    path = str(tmp_path / "journal.log")  # journal-file storage works as well as SQLite
    study = optuna.create_study(study_name=f"cvops-{version}", storage=open_storage(path), direction="maximize")
    study.ask()  # a trial that a crashed worker never finished
    result = run_study(storage, version, config(1), path)
    states = [t.state for t in optuna.load_study(study_name=f"cvops-{version}", storage=open_storage(path)).trials]
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


def test_several_workers_leave_each_others_running_trials_alone(storage: ArtifactStorage, version: str, tmp_path: Path) -> None:
    url = default_storage_url(tmp_path / "shared")
    other_worker = optuna.create_study(study_name=f"cvops-{version}", storage=open_storage(url, 60), direction="maximize")
    other_worker.ask()  # another worker's trial, still running (fresh heartbeat window)
    cfg = config(1)
    cfg.single_worker = False
    result = run_study(storage, version, cfg, url)
    states = [t.state for t in optuna.load_study(study_name=f"cvops-{version}", storage=url).trials]
    assert states == [TrialState.RUNNING, TrialState.COMPLETE]
    assert result.n_failed == 0


def test_a_bug_in_a_trial_fails_the_study_instead_of_being_swallowed(
    storage: ArtifactStorage, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvops_dagster.training import tuning

    def broken(*args: object, **kwargs: object) -> tuple[float, int]:
        raise TypeError("a real bug")

    monkeypatch.setattr(tuning, "train_trial", broken)
    with pytest.raises(TypeError, match="a real bug"):
        run_study(storage, version, config(2))


def test_a_study_with_no_completed_trial_fails_clearly(
    storage: ArtifactStorage, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvops_dagster.training import tuning

    def diverges(*args: object, **kwargs: object) -> tuple[float, int]:
        raise tuning.TrialFailed("val_acc is not finite (nan)")

    monkeypatch.setattr(tuning, "train_trial", diverges)
    with pytest.raises(tuning.StudyFailed, match=r"no trial completed \(2 failed"):
        run_study(storage, version, config(2))


def test_storage_url_is_redacted_in_results_and_logs(
    storage: ArtifactStorage, version: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvops_dagster.training import tuning

    real_open = tuning.open_storage
    # A PostgreSQL URL with a password, served by a SQLite file so no server is needed.
    monkeypatch.setattr(tuning, "open_storage", lambda url, hb=None: real_open("sqlite:///" + str(tmp_path / "o.db"), hb))
    with caplog.at_level("INFO", logger="cvops_dagster.training.tuning"):
        result = run_study(storage, version, config(1), "postgresql://cvops:hunter2@db.local/optuna")
    assert result.storage_url == "postgresql://cvops:***@db.local/optuna"
    assert "db.local" in caplog.text and "hunter2" not in caplog.text
    assert "hunter2" not in str(result.summary())


def test_remote_artifact_root_keeps_the_study_in_the_store(
    tmp_path: Path, cleaned_datasets: DatasetCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RemoteLikeStorage(str(tmp_path / "bucket"), storage_options={"auto_mkdir": True})
    cleaned_datasets.shapes(store, n_classes=2, per_class=20, size=(12, 12))
    version = only_version(store)
    # Two "machines": different working directories; the study must follow the store.
    monkeypatch.chdir(tmp_path)
    first = run_study(store, version, config(1))
    assert store.exists("optuna/journal.log") and not (tmp_path / ".cvops-optuna").exists()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    second = run_study(store, version, config(2))
    assert first.n_complete == 1 and second.n_complete == 2 and second.n_trials_this_run == 1
