"""Faults of one process in a torchrun job (gloo on the CPU): a rank killed outright or hung
mid-epoch stops the others within a bounded time with one sentence naming it, the last
checkpoint stays intact and the run resumes in the same MLflow run, by hand or by torchrun's
own restart (--max-restarts)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, resume_training, set_args, store_client, tiny_hippocampus_overrides

from segment.training.checkpoint import CHECKPOINT_FILE, load_checkpoint

CONFIG = str(ROOT / "configs" / "hippocampus_3d.yaml")
# Generous: the job stops in seconds, but these machines are shared and noisy.
STOP_LIMIT_SECONDS = 120


@pytest.fixture
def env(tmp_path, hippocampus_root) -> dict:
    return os.environ | {
        "SEGMENT_DATA_ROOT": str(hippocampus_root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
    }


def start_job(
    tmp_path: Path, env: dict, epochs: int, *torchrun_options: str, timeout: float = 60
) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 segment train`` of the tiny set-up in the background, in a
    process group of its own, its output in tmp_path/stdout.txt and stderr.txt."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun_options,
        "-m", "segment.cli", "train", "--config", CONFIG, "--output-dir", str(tmp_path / "runs"), "--quiet",
        *set_args([*tiny_hippocampus_overrides(epochs=epochs), f"trainer.collective_timeout_seconds={timeout}"]),
    ]  # fmt: skip
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )


def wait_for_logged_epoch(job: subprocess.Popen, runs: Path, env: dict) -> str:
    """The run id, once the job has logged an epoch: its processes are then in the next one."""
    client = store_client(env["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 300
    while not list(runs.glob(f"*/{CHECKPOINT_FILE}")):
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    run_id = next(runs.glob(f"*/{CHECKPOINT_FILE}")).parent.name
    while not client.get_run(run_id).data.metrics.get("epoch"):
        assert job.poll() is None and time.monotonic() < deadline, "no epoch was logged"
        time.sleep(0.05)
    return run_id


def rank_pid(torchrun_pid: int, local_rank: int) -> int:
    """The process torchrun started for ``local_rank``: its child with that LOCAL_RANK."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):  # ended while being read
            continue
        if parent == torchrun_pid and f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"torchrun {torchrun_pid} has no process of local rank {local_rank}")


def has_ended(pid: int) -> bool:
    """Whether process ``pid`` has ended: gone, or a zombie its parent has not collected yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for_end(pid: int, limit: float) -> float:
    """Seconds until process ``pid`` (not a child of this one) has ended."""
    start = time.monotonic()
    while not has_ended(pid):
        assert time.monotonic() - start < limit, f"process {pid} is still running after {limit} s"
        time.sleep(0.05)
    return time.monotonic() - start


def job_stderr(tmp_path: Path) -> str:
    """What the job printed on stderr; none of it a traceback from this project's code."""
    stderr = (tmp_path / "stderr.txt").read_text()
    assert not re.search(r'File ".*/segment/', stderr), stderr[-8000:]
    return stderr


def our_sentences(stderr: str) -> list[str]:
    """The lines our processes printed about why they stopped (torchrun prints its own report)."""
    return [line for line in stderr.splitlines() if re.match(r"(Rank|Another rank|Training stopped)", line)]


def steps(client, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


@pytest.fixture
def job_reaper():
    """Kills what a job left running, torchrun and its processes, should the test fail halfway."""
    jobs: list[subprocess.Popen] = []
    yield jobs.append
    for job in jobs:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=60)


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_stops_the_job_in_one_sentence_and_the_run_resumes(tmp_path, env, job_reaper):
    runs = tmp_path / "runs"
    job = start_job(tmp_path, env, epochs=500)
    job_reaper(job)
    run_id = wait_for_logged_epoch(job, runs, env)

    os.kill(rank_pid(job.pid, local_rank=1), signal.SIGKILL)
    killed = time.monotonic()
    job.wait(timeout=STOP_LIMIT_SECONDS)
    seconds = time.monotonic() - killed
    print(f"\n{seconds:.1f} s from SIGKILL of rank 1 to the exit of torchrun")
    assert job.returncode != 0

    saved = load_checkpoint(runs / run_id)["state"].epochs_done
    assert saved >= 1
    stderr = job_stderr(tmp_path)
    assert our_sentences(stderr) == [
        f"Rank 1 of 2 stopped (killed or crashed) during epoch {saved + 1}; the checkpoint of epoch {saved} "
        f"is intact: continue with `segment train --resume {run_id}`."
    ], stderr[-8000:]
    client = store_client(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "FAILED"
    logged = steps(client, run_id)

    resumed = resume_training(run_id, runs, saved + 2, tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Finished run {run_id}" in resumed.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [path.name for path in runs.iterdir()] == [run_id]  # torchrun's record gone with the job
    assert set(logged) <= set(range(1, saved + 1))  # no epoch beyond the checkpoint was logged
    for key in ("train_loss", "val_mean_dice", "epoch"):
        assert steps(client, run_id, key) == list(range(1, saved + 3)), key  # each epoch once


@pytest.mark.slow
@pytest.mark.faults
def test_a_rank_that_hangs_stops_the_job_within_the_collective_timeout(tmp_path, env, job_reaper):
    runs = tmp_path / "runs"
    job = start_job(tmp_path, env, epochs=500, timeout=10)
    job_reaper(job)
    run_id = wait_for_logged_epoch(job, runs, env)
    hung, rank0 = rank_pid(job.pid, local_rank=1), rank_pid(job.pid, local_rank=0)

    os.kill(hung, signal.SIGSTOP)
    try:
        seconds = wait_for_end(rank0, STOP_LIMIT_SECONDS)
    finally:
        # torchrun's SIGTERM waits for the hung process to go on.
        os.kill(hung, signal.SIGCONT)
    print(f"\n{seconds:.1f} s from SIGSTOP of rank 1 to the exit of rank 0 (collective timeout 10 s)")
    assert seconds >= 10
    job.wait(timeout=STOP_LIMIT_SECONDS)
    assert job.returncode != 0

    saved = load_checkpoint(runs / run_id)["state"].epochs_done
    stderr = job_stderr(tmp_path)
    assert our_sentences(stderr) == [
        f"Another rank of 2 stopped (killed, crashed, or silent for trainer.collective_timeout_seconds = 10) "
        f"during epoch {saved + 1}; the checkpoint of epoch {saved} is intact: "
        f"continue with `segment train --resume {run_id}`."
    ], stderr[-8000:]


@pytest.mark.slow
@pytest.mark.faults
def test_torchrun_restarts_the_group_which_resumes_the_run_by_itself(tmp_path, env, job_reaper):
    runs = tmp_path / "runs"
    epochs = 12  # enough that the kill comes before the end
    job = start_job(tmp_path, env, epochs, "--max-restarts=1")
    job_reaper(job)
    run_id = wait_for_logged_epoch(job, runs, env)

    os.kill(rank_pid(job.pid, local_rank=1), signal.SIGKILL)
    job.wait(timeout=600)
    stderr = job_stderr(tmp_path)
    assert job.returncode == 0, stderr[-8000:]

    [sentence] = our_sentences(stderr)
    assert sentence.startswith("Rank 1 of 2 stopped (killed or crashed) during epoch ")
    assert sentence.endswith("is intact and torchrun restarts the group from it.")
    assert (tmp_path / "stdout.txt").read_text().count(f"Finished run {run_id}") == 1
    client = store_client(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("train_loss", "val_mean_dice", "epoch"):
        assert steps(client, run_id, key) == list(range(1, epochs + 1)), key  # each epoch once
    assert [path.name for path in runs.iterdir()] == [run_id]  # torchrun's record gone with the job
