"""The MLflow store going away while a run trains: a SQLite file another writer holds locked, a
tracking server stopped. Training goes on and checkpoints every epoch; its metrics wait for
the store and are logged once it answers, each epoch once, or what was never logged is named
in one sentence at the end, with where the model and the checkpoint are."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port, resume_training, start_tiny_training, store_client

from segment.training.checkpoint import load_checkpoint
from segment.training.tracking_callbacks import UNLOGGED_FILE, epochs_text

EPOCHS = 8


def first_epoch_logged(uri: str, training: subprocess.Popen) -> str:
    """Wait until the training has logged its first epoch; its run id."""
    client = store_client(uri)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert training.poll() is None, "training ended before its first epoch was logged"
        experiments = [experiment.experiment_id for experiment in client.search_experiments()]
        runs = client.search_runs(experiments) if experiments else []
        if runs and runs[0].data.metrics.get("epoch"):
            return runs[0].info.run_id
        time.sleep(0.2)
    pytest.fail("no epoch was logged within 240 s")


def logged_epochs(uri: str, run_id: str) -> list[int]:
    return sorted(metric.step for metric in store_client(uri).get_metric_history(run_id, "train_loss"))


@contextmanager
def store_held_until_refused(database: Path, training: subprocess.Popen, lines: list[str]) -> Iterator[None]:
    """Another writer holds the SQLite ``database`` until the training has said (in ``lines``,
    its stderr) that the store did not take an epoch, however slow the machine; it lets go when
    the block ends."""
    holder = sqlite3.connect(database, isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("Warning: the MLflow store") for line in lines):
            assert time.monotonic() < deadline and training.poll() is None, "".join(lines)
            time.sleep(0.2)
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.fixture
def env(hippocampus_root) -> dict:
    return os.environ | {"SEGMENT_DATA_ROOT": str(hippocampus_root)}


@pytest.mark.slow
def test_a_sqlite_store_locked_mid_run_gets_every_epoch_once_it_is_free(tmp_path, env):
    database = tmp_path / "mlflow.db"
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{database}"}
    runs = tmp_path / "runs"
    training = start_tiny_training(
        tmp_path, env, runs, EPOCHS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(training.stderr), daemon=True)
    reader.start()
    try:
        run_id = first_epoch_logged(env["MLFLOW_TRACKING_URI"], training)
        with store_held_until_refused(database, training, lines):
            pass  # one log refused, then the store is free again
        training.wait(timeout=300)
        reader.join(timeout=30)
        stdout, stderr = training.stdout.read(), "".join(lines)
    finally:
        training.kill()
        training.wait()

    assert training.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert any(line.startswith("Warning: the MLflow store") and "(database is locked)" in line for line in lines), stderr
    assert any(line.startswith("The MLflow store answers again: the metrics of epoch") for line in lines), stderr
    assert f"Finished run {run_id}" in stdout
    assert logged_epochs(env["MLFLOW_TRACKING_URI"], run_id) == list(range(1, EPOCHS + 1))
    client = store_client(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.search_model_versions("name='hippocampus_3d'"), "the model was not registered"
    assert load_checkpoint(runs / run_id)["state"].epochs_done == EPOCHS


@pytest.mark.slow
def test_a_run_stopped_while_the_store_is_locked_logs_the_held_epochs_when_resumed(tmp_path, env):
    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    env |= {"MLFLOW_TRACKING_URI": uri}
    runs = tmp_path / "runs"
    # Far more epochs than run before the stop: the run is stopped mid-way, whatever the machine.
    training = start_tiny_training(tmp_path, env, runs, 200, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(training.stderr), daemon=True)
    reader.start()
    try:
        run_id = first_epoch_logged(uri, training)
        with store_held_until_refused(database, training, lines):
            training.send_signal(signal.SIGINT)  # Ctrl-C, with epochs held for the store
            training.wait(timeout=120)
    finally:
        training.kill()
        training.wait()
    assert training.returncode == 130, "".join(lines)[-2000:]
    done = load_checkpoint(runs / run_id)["state"].epochs_done
    assert (runs / run_id / UNLOGGED_FILE).is_file()
    assert logged_epochs(uri, run_id)[-1] < done

    resumed = resume_training(run_id, runs, done, tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert logged_epochs(uri, run_id) == list(range(1, done + 1)), "an epoch was lost or logged twice"
    assert not (runs / run_id / UNLOGGED_FILE).exists()
    assert store_client(uri).get_run(run_id).info.status == "FINISHED"


class TrackingServer:
    """``mlflow server`` on a free port of 127.0.0.1, its runs and artifacts in ``folder``; it can
    be stopped and started again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self.uri = f"http://127.0.0.1:{free_port()}"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", f"sqlite:///{self._folder / 'server.db'}",
            "--artifacts-destination", str(self._folder / "artifacts"),
            "--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1], "--workers", "1",
        ]
        # A session of its own, so that stopping it stops its workers too.
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                assert self._process.poll() is None, "the MLflow server ended"
                time.sleep(0.3)
        pytest.fail("the MLflow server did not answer /health within 180 s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=60)
        self._process = None


@pytest.fixture
def server(tmp_path) -> Iterator[TrackingServer]:
    server = TrackingServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.faults
def test_a_tracking_server_stopped_mid_run_costs_no_epoch_and_is_reported_in_one_sentence(tmp_path, env, server):
    env |= {"MLFLOW_TRACKING_URI": server.uri}
    runs = tmp_path / "runs"
    training = start_tiny_training(
        tmp_path, env, runs, EPOCHS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        run_id = first_epoch_logged(server.uri, training)
        server.stop()
        stopped = time.monotonic()
        _, stderr = training.communicate(timeout=300)
    finally:
        training.kill()
        training.wait()
    # MLflow's own retries would take about four minutes for each request the run makes.
    assert time.monotonic() - stopped < 120, "the run waited minutes on the stopped server"

    assert training.returncode == 2
    assert "Traceback" not in stderr
    warning, error = stderr.splitlines()
    assert warning.startswith(f"Warning: the MLflow store {server.uri} did not take the metrics of epoch")
    assert "(Connection refused); training goes on" in warning
    assert load_checkpoint(runs / run_id)["state"].epochs_done == EPOCHS

    server.start()
    logged = logged_epochs(server.uri, run_id)
    assert logged == list(range(1, len(logged) + 1)), "an epoch was logged twice, or one skipped"
    run_dir = runs / run_id
    assert error == (
        f"Error: Training finished, but the MLflow store {server.uri} did not take the metrics of "
        f"{epochs_text(list(range(len(logged) + 1, EPOCHS + 1)))}, the learning curves, the validation "
        f"overlay and the model (Connection refused); the best model is in {run_dir / 'best'} and the "
        f"checkpoint in {run_dir / 'checkpoint.pt'}, and once the store answers, segment train --resume "
        f"{run_id} --output-dir {runs} logs them."
    )

    # The command the sentence gives, with the store back: the run is finished and its model registered.
    resumed = resume_training(run_id, runs, EPOCHS, tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    client = store_client(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [version.run_id for version in client.search_model_versions("name='hippocampus_3d'")] == [run_id]
    assert logged_epochs(server.uri, run_id) == list(range(1, EPOCHS + 1)), "the held epochs were not logged once"
    assert not (run_dir / UNLOGGED_FILE).exists()
