"""Faults: a training process killed outright, corrupt checkpoints, missing MLflow artifacts and
destinations that cannot be written. Each is survived or refused in one sentence."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    one_sentence_error,
    resume_training,
    set_args,
    start_tiny_training,
    store_client,
    tiny_hippocampus_overrides,
)
from conftest import run_segment as segment

from segment.training.checkpoint import CHECKPOINT_FILE, load_checkpoint
from segment.training.stop_signals import StopSignals

CONFIG = str(ROOT / "configs" / "hippocampus_3d.yaml")


@pytest.fixture
def env(tmp_path, hippocampus_root) -> dict:
    return os.environ | {
        "SEGMENT_DATA_ROOT": str(hippocampus_root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


@pytest.fixture
def killed_run(tmp_path, env) -> tuple[Path, str, int]:
    """A real training process killed with SIGKILL partway through an epoch after its first
    checkpoint: (runs folder, run id, epochs its checkpoint holds)."""
    runs = tmp_path / "runs"
    process = start_tiny_training(
        tmp_path, env, runs, epochs=500, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not list(runs.glob(f"*/{CHECKPOINT_FILE}")) and time.monotonic() < deadline:
            assert process.poll() is None, "training ended before its first checkpoint"
            time.sleep(0.05)
        checkpoint = next(runs.glob(f"*/{CHECKPOINT_FILE}"))
        # An epoch's metrics are logged after its checkpoint and just before the next epoch
        # starts: once the store has them, the process is into the next epoch.
        client = store_client(env["MLFLOW_TRACKING_URI"])
        while not client.get_run(checkpoint.parent.name).data.metrics.get("epoch"):
            assert process.poll() is None and time.monotonic() < deadline, "no epoch was logged"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    run_dir = checkpoint.parent
    return runs, run_dir.name, load_checkpoint(run_dir)["state"].epochs_done


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_in_the_same_run(tmp_path, env, killed_run):
    runs, run_id, epochs_done = killed_run
    assert epochs_done >= 1
    client = store_client(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves no chance to close it

    resumed = resume_training(run_id, runs, epochs_done + 2, tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Finished run {run_id}" in resumed.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [path.name for path in runs.iterdir()] == [run_id]
    assert not list((runs / run_id).glob(f".{CHECKPOINT_FILE}.*")), "a temporary file was left behind"
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert len(steps) == len(set(steps)), "an epoch was logged twice"
    assert max(steps) == epochs_done + 2
    assert {epochs_done + 1, epochs_done + 2} <= set(steps)
    assert load_checkpoint(runs / run_id)["state"].epochs_done == epochs_done + 2


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_an_epoch_is_saved_waits_for_the_save_then_stops(stop):
    saved = []
    with StopSignals() as stop_signals:
        with pytest.raises(KeyboardInterrupt), stop_signals.saving():
            os.kill(os.getpid(), stop)
            saved.append("checkpoint")
            saved.append("metrics")
        assert saved == ["checkpoint", "metrics"]
        # Between saves the same signal stops at once.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), stop)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_refused_in_one_sentence(tmp_path, env, killed_run):
    runs, run_id, _ = killed_run
    checkpoint = runs / run_id / CHECKPOINT_FILE
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    result = segment("train", "--resume", run_id, "--output-dir", str(runs), cwd=tmp_path, env=env)
    message = one_sentence_error(result)
    assert "corrupt" in message and CHECKPOINT_FILE in message
    assert result.returncode == 2


@pytest.mark.slow
def test_a_missing_mlflow_artifact_is_reported_in_one_sentence(tmp_path, env, killed_run, hippocampus_root):
    runs, run_id, epochs_done = killed_run
    finished = resume_training(run_id, runs, epochs_done + 1, tmp_path, env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    scan = str(hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    mask = tmp_path / "mask.nii.gz"

    missing_path = segment(
        "predict", "--model", f"runs:/{run_id}/no_such_model", "--input", scan, "--output", str(mask),
        cwd=tmp_path, env=env,
    )
    assert "runs:/" in one_sentence_error(missing_path)

    # The registered model's files deleted from the artifact store behind MLflow's back.
    shutil.rmtree(tmp_path / "mlruns")
    deleted = segment(
        "predict", "--model", "models:/hippocampus_3d@best", "--input", scan, "--output", str(mask),
        cwd=tmp_path, env=env,
    )
    assert "models:/hippocampus_3d@best" in one_sentence_error(deleted)
    assert not mask.exists()


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.mark.slow
def test_an_unwritable_mask_destination_is_refused_before_any_work(tmp_path, read_only_folder, hippocampus_root):
    scan = str(hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    # The model does not exist: the destination must be refused before the model is even looked up.
    result = segment(
        "predict", "--model", "no_such_model", "--input", scan, "--output", str(read_only_folder / "m.nii.gz"),
        cwd=tmp_path, env=dict(os.environ),
    )
    message = one_sentence_error(result)
    assert "read-only" in message and "no_such_model" not in message
    assert list(read_only_folder.iterdir()) == []


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path, env, read_only_folder):
    result = segment(
        "train", "--config", CONFIG, "--output-dir", str(read_only_folder / "runs"), "--quiet",
        *set_args(tiny_hippocampus_overrides()), cwd=tmp_path, env=env,
    )
    assert "read-only" in one_sentence_error(result)
    assert not (tmp_path / "mlflow.db").exists(), "a run was started"


@pytest.mark.slow
def test_two_trainings_started_together_on_a_new_sqlite_store_both_finish(tmp_path, env):
    """MLflow creates a SQLite store's tables on first use; two processes doing it at once both
    failed inside its schema migration. Both now finish, with two runs and two model versions."""
    trainings = [
        start_tiny_training(
            tmp_path, env, tmp_path / f"runs{index}", 1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for index in (1, 2)
    ]
    outputs = [training.communicate(timeout=300)[0].decode() for training in trainings]
    assert [training.returncode for training in trainings] == [0, 0], outputs
    client = store_client(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert sorted(run.info.status for run in runs) == ["FINISHED", "FINISHED"]
    versions = client.search_model_versions(f"name='{runs[0].data.params['name']}'")
    assert sorted(int(version.version) for version in versions) == [1, 2]
