"""Checkpoints: owned by one study and retry chain, loaded safely, removed, and a full disk."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import REPO, cli_env, sleepy_spec
from optuna.trial import TrialState

from search import record
from search.checkpoint import Checkpoint, Checkpoints
from search.exceptions import CheckpointError
from search.spec import spec_from_dict
from search.storage import open_storage
from search.study import create_or_load_study


class _RunsACommand:
    """What an attacker plants: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["torch-zip", "plain-pickle"])
def test_a_planted_checkpoint_is_not_executed(tmp_path: Path, fmt: str, caplog) -> None:
    checkpoints = Checkpoints(tmp_path / "ckpt", "study", "0123456789abcdef")
    target = checkpoints.for_chain(0).path
    target.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    payload = {"epoch": 3, "model": _RunsACommand(marker)}
    if fmt == "torch-zip":
        torch.save(payload, target)
    else:
        target.write_bytes(pickle.dumps(payload))
    with caplog.at_level(logging.WARNING, logger="search.checkpoint"):
        assert checkpoints.for_chain(0).load() is None
        assert Checkpoint(target).load() is None
    assert not marker.exists(), "loading the planted file ran its command"
    assert "cannot be loaded safely" in caplog.text


def test_a_checkpoint_of_another_study_or_chain_is_ignored_and_logged(
    tmp_path: Path, caplog
) -> None:
    ours = Checkpoints(tmp_path, "same-name", "a" * 32)
    theirs = Checkpoints(tmp_path, "same-name", "b" * 32)
    assert ours.folder != theirs.folder, "a reused name gets its own folder"
    theirs.for_chain(0).save({"epoch": 7})
    ours.folder.mkdir(parents=True)
    shutil.copy(theirs.for_chain(0).path, ours.for_chain(0).path)
    shutil.copy(theirs.for_chain(0).path, theirs.for_chain(1).path)
    with caplog.at_level(logging.WARNING, logger="search.checkpoint"):
        assert ours.for_chain(0).load() is None
        assert theirs.for_chain(1).load() is None
    assert theirs.for_chain(0).load() == {"epoch": 7}
    assert caplog.text.count("belongs to") == 2


def test_finished_trials_leave_nothing_unless_best_weights_are_kept(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path, "s", "c" * 32)
    for root in (0, 1):
        chain = checkpoints.for_chain(root)
        chain.save({"epoch": 1, "w": torch.ones(2)})
        chain.mark_best()
        chain.save({"epoch": 2, "w": torch.zeros(2)})
    checkpoints.finished(0, keep=False)
    checkpoints.finished(1, keep=True)
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["trial-1.best.pt"]
    best = torch.load(checkpoints.folder / "trial-1.best.pt", weights_only=True)
    assert best["state"]["epoch"] == 1


def test_an_unwritable_folder_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"cannot create checkpoint folder .*a-file"):
        Checkpoints(blocker / "ckpt", "s", "d" * 32).check_writable()


def test_a_worker_refuses_an_unwritable_checkpoint_folder_at_start(
    sqlite_url: str, study_name: str, tmp_path: Path
) -> None:
    create_or_load_study(spec_from_dict(sleepy_spec(study_name, n_trials=1)),
                         open_storage(sqlite_url))
    (tmp_path / "a-file").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "search", "worker", study_name, "--checkpoint-dir",
         str(tmp_path / "a-file" / "ckpt")],
        capture_output=True, text=True, timeout=120, env=cli_env(sqlite_url))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot create checkpoint folder"), last
    study = optuna.load_study(study_name=study_name, storage=open_storage(sqlite_url))
    assert study.trials == [], "no trial was claimed"


_FILL = """
import sys, torch
from search.checkpoint import Checkpoints
from search.exceptions import DiskFullError
chain = Checkpoints(sys.argv[1], "s", "e" * 32).for_chain(0)
chain.save({"epoch": 1})
try:
    chain.save({"epoch": 2, "w": torch.zeros(1_000_000)})
except DiskFullError as e:
    print("DiskFullError:", e)
print("still loads epoch", chain.load()["epoch"])
"""


def test_a_full_disk_says_disk_full_and_leaves_no_temp_file(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    # A real 256 KiB tmpfs, mounted in a private user+mount namespace (no root needed).
    script = (f"mount -t tmpfs -o size=256k tmpfs {folder} && {sys.executable} -c "
              f"'{_FILL}' {folder} && ls -A {folder}/*")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                            text=True, timeout=120, env=cli_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DiskFullError: cannot save checkpoint" in result.stdout
    assert "disk full" in result.stdout
    assert "still loads epoch 1" in result.stdout, "the last good checkpoint survives"
    listing = result.stdout.strip().splitlines()[-1]
    assert listing.endswith("trial-0.pt"), f"only the checkpoint is left: {result.stdout}"
    assert ".tmp" not in result.stdout.split("still loads")[1]


@pytest.mark.slow
def test_a_new_study_with_a_reused_name_never_resumes_the_old_ones_checkpoints(
    tmp_path: Path, study_name: str
) -> None:
    database = tmp_path / "study.db"
    url = f"sqlite:///{database}"
    ckpt = tmp_path / "ckpt"
    uuids = []
    for _ in range(2):  # the same name twice: `rm search.db` and start over
        study = create_or_load_study(
            spec_from_dict(sleepy_spec(study_name, n_trials=2, epochs=3)), open_storage(url))
        uuids.append(study.user_attrs[record.STUDY_UUID])
        worker = subprocess.run(
            [sys.executable, "-m", "search", "worker", study_name, "--checkpoint-dir", str(ckpt)],
            capture_output=True, text=True, timeout=180,
            env=cli_env(url, SEARCH_TEST_EPOCH_SECONDS="0.05"))
        assert worker.returncode == 0, worker.stderr[-3000:]
        trials = optuna.load_study(study_name=study_name, storage=open_storage(url)).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
        for trial in trials:
            started = {row["started_at_epoch"] for row in trial.user_attrs["epoch_metrics"]}
            assert started == {0}, f"trial {trial.number} resumed a foreign checkpoint"
        database.unlink()
    assert uuids[0] != uuids[1]


def test_the_study_uuid_is_set_once(sqlite_url: str, study_name: str) -> None:
    spec = spec_from_dict(sleepy_spec(study_name))
    first = create_or_load_study(spec, open_storage(sqlite_url)).user_attrs[record.STUDY_UUID]
    again = create_or_load_study(spec, open_storage(sqlite_url)).user_attrs[record.STUDY_UUID]
    assert first == again and len(first) == 32



@pytest.mark.slow
def test_a_worker_on_a_full_checkpoint_folder_hands_the_trial_back_and_says_disk_full(
    tmp_path: Path, study_name: str
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = sleepy_spec(study_name, n_trials=1, objective={"function": "objectives:saves_big"})
    create_or_load_study(spec_from_dict(spec), open_storage(url))
    folder = tmp_path / "small"
    folder.mkdir()
    worker = f"{sys.executable} -m search worker {study_name} --checkpoint-dir {folder}"
    # A real 256 KiB tmpfs, mounted in a private user+mount namespace (no root needed).
    script = (f"mount -t tmpfs -o size=256k tmpfs {folder} && {worker}; echo rc=$?; "
              f"ls -A {folder}/*")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                            text=True, timeout=180, env=cli_env(url), cwd=REPO)
    assert "rc=2" in result.stdout, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot save checkpoint") and "disk full" in last, last
    assert ".tmp" not in result.stdout, f"a failed save left its temp file: {result.stdout}"
    trials = optuna.load_study(study_name=study_name, storage=open_storage(url)).trials
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs[record.OUTCOME] == record.Outcome.DISK_FULL.value
    assert [t.state for t in trials[1:]] == [TrialState.WAITING], "queued again, not lost"
