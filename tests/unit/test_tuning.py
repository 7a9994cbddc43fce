"""Hyperparameter study: pruning, persistence, resume, crash recovery and several workers."""

from __future__ import annotations

import os
import sqlite3
import sys
import types
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.training import tuning
from cvops_dagster.training.tuning import StudyConfig, default_storage_url, make_pruner, open_storage, run_study
from tests.unit.storage_kinds import RemoteLikeStorage
from tests.unit.synthetic_datasets import DatasetCache, only_version

SPACE = {"lr": ("float", 1e-3, 2e-2, True), "dropout": ("float", 0.0, 0.3)}
FIXED = {"width": 8, "batch_size": 16}


class PruneTrialOne(optuna.pruners.BasePruner):
    """Deterministically prunes trial number 1 at its first report, nothing else."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1


def config(n_trials: int, pruner: object = "none", workers: int = 1) -> StudyConfig:
    return StudyConfig(
        n_trials=n_trials,
        max_epochs=2,
        num_threads=workers,  # one torch thread per worker
        pruner=pruner,
        search_space=SPACE,
        fixed_params=FIXED,
        n_startup_trials=2,
        workers=workers,
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


# --- several workers -------------------------------------------------------------------------


def test_two_workers_finish_exactly_the_budget_and_both_run_trials(storage: ArtifactStorage, version: str, tmp_path: Path) -> None:
    url = default_storage_url(tmp_path / "optuna")
    result = run_study(storage, version, config(6, workers=2), url)
    # Exactly the budget: MaxTrialsCallback alone would let the second worker start a 7th.
    assert result.n_complete + result.n_pruned == 6 and result.n_failed == 0
    assert result.n_trials_this_run == 6 and result.workers == 2
    assert set(result.trials_per_worker) == {"0", "1"} and sum(result.trials_per_worker.values()) == 6
    assert all(count > 0 for count in result.trials_per_worker.values()), result.trials_per_worker
    assert result.worker_exit_codes == {"0": 0, "1": 0}
    trials = optuna.load_study(study_name=result.study_name, storage=url).trials
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert len({t.user_attrs["worker_id"] for t in trials}) == 2
    assert sorted(result.trials["worker"]) == sorted(t.user_attrs["worker"] for t in trials)
    # Each worker samples with its own seed: no two start-up trials drew the same point.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    # A rerun with the budget already met runs nothing, with any number of workers.
    again = run_study(storage, version, config(6, workers=2), url)
    assert again.n_trials_this_run == 0 and again.trials_per_worker == {"0": 0, "1": 0}


def test_one_worker_is_reproducible_for_a_seed(storage: ArtifactStorage, version: str, tmp_path: Path) -> None:
    runs = [run_study(storage, version, config(3), default_storage_url(tmp_path / name)) for name in ("a", "b")]
    studies = [optuna.load_study(study_name=r.study_name, storage=r.storage_url) for r in runs]
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]
    assert [t.value for t in studies[0].trials] == pytest.approx([t.value for t in studies[1].trials])
    assert runs[0].best_params == runs[1].best_params and runs[0].trials_per_worker == {"0": 3}


def _age_heartbeat(url: str, trial_id: int) -> None:
    """Make a trial's last heartbeat years old, as a worker that crashed long ago leaves it."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        changed = db.execute("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00.000000' WHERE trial_id = ?", (trial_id,))
        assert changed.rowcount == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_several_workers_fail_a_crashed_workers_trial_by_heartbeat_only(storage: ArtifactStorage, version: str, tmp_path: Path) -> None:
    url = default_storage_url(tmp_path / "shared")
    other = open_storage(url, 60)
    elsewhere = optuna.create_study(study_name=f"cvops-{version}", storage=other, direction="maximize")
    crashed, live = elsewhere.ask(), elsewhere.ask()
    for trial in (crashed, live):
        other.record_heartbeat(trial._trial_id)  # what study.optimize's heartbeat thread does
    _age_heartbeat(url, crashed._trial_id)  # its worker died long ago; the other one is beating
    result = run_study(storage, version, config(2, workers=2), url)  # single_worker: still heartbeats
    states = [t.state for t in optuna.load_study(study_name=f"cvops-{version}", storage=url).trials]
    assert states[:2] == [TrialState.FAIL, TrialState.RUNNING]
    assert result.n_failed == 1 and result.n_complete == 2


def _worker_one_dies(job: Any, budget: Any, errors: Any) -> None:
    """A study worker process whose worker 1 dies at once without a word (as if killed)."""
    if job.index == 1:
        os._exit(3)
    tuning._study_worker(job, budget, errors)


def _every_worker_dies(job: Any, budget: Any, errors: Any) -> None:
    os._exit(3)


def test_a_worker_that_dies_is_reported_and_the_others_finish_the_budget(
    storage: ArtifactStorage, version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuning, "_study_worker", _worker_one_dies)  # the spawned target, pickled by name
    result = run_study(storage, version, config(3, workers=2), default_storage_url(tmp_path / "optuna"))
    assert result.worker_exit_codes == {"0": 0, "1": 3}
    assert result.trials_per_worker == {"0": 3, "1": 0} and result.n_complete == 3


def test_workers_that_all_die_fail_the_study_clearly(
    storage: ArtifactStorage, version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuning, "_study_worker", _every_worker_dies)
    with pytest.raises(tuning.StudyFailed, match=r"no trial completed .*worker exit codes \{'0': 3, '1': 3\}"):
        run_study(storage, version, config(2, workers=2), default_storage_url(tmp_path / "optuna"))


def test_workers_that_cannot_even_start_fail_the_study_instead_of_hanging_it(
    tmp_path: Path, cleaned_datasets: DatasetCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dataset well over a pipe's 64 KiB: were it sent in the start payload, the parent
    # would block in Process.start() on a child that died before reading it.
    store = ArtifactStorage(str(tmp_path / "artifacts"))
    cleaned_datasets.shapes(store, n_classes=2, per_class=40, size=(48, 48))
    # The workers' target lives in a module only this process has: each child dies while
    # unpickling what it was asked to run, before any study code (as a failing import would).
    phantom = types.ModuleType("cvops_phantom_worker_module")
    exec("def target(job, budget, errors):\n    raise AssertionError('never runs')", phantom.__dict__)
    monkeypatch.setitem(sys.modules, phantom.__name__, phantom)
    monkeypatch.setattr(tuning, "_study_worker", phantom.target)
    with pytest.raises(tuning.StudyFailed, match=r"worker exit codes \{'0': 1, '1': 1\}"):
        run_study(store, only_version(store), config(2, workers=2), default_storage_url(tmp_path / "optuna"))


def test_an_error_in_a_worker_fails_the_study_with_its_message(storage: ArtifactStorage, version: str, tmp_path: Path) -> None:
    broken = config(2, workers=2)
    broken.accelerator = "no-such-accelerator"  # Lightning refuses it inside the trial: not a trial's own failure
    url = default_storage_url(tmp_path / "optuna")
    with pytest.raises(tuning.WorkerFailed, match=r"(?s)worker \d of study .*no-such-accelerator"):
        run_study(storage, version, broken, url)
    # Nothing is left RUNNING: the failing trial was told FAIL, the stopped worker's was failed.
    states = {t.state for t in optuna.load_study(study_name=f"cvops-{version}", storage=url).trials}
    assert TrialState.RUNNING not in states


def test_workers_must_be_positive(storage: ArtifactStorage, version: str) -> None:
    with pytest.raises(ValueError, match="workers"):
        run_study(storage, version, config(1, workers=0))


def test_two_workers_share_the_journal_kept_in_a_remote_store(
    tmp_path: Path, cleaned_datasets: DatasetCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RemoteLikeStorage(str(tmp_path / "bucket"), storage_options={"auto_mkdir": True})
    cleaned_datasets.shapes(store, n_classes=2, per_class=20, size=(12, 12))
    version = only_version(store)
    monkeypatch.chdir(tmp_path)
    result = run_study(store, version, config(3, workers=2))
    assert result.n_complete == 3 and sum(result.trials_per_worker.values()) == 3
    # What the store holds is a whole journal: it loads, with every trial finished.
    (tmp_path / "copy.log").write_bytes(store.read_bytes("optuna/journal.log"))
    trials = optuna.load_study(study_name=f"cvops-{version}", storage=open_storage(str(tmp_path / "copy.log"))).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
