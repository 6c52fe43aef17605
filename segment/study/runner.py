"""Training the study's runs, resumably: a run finished in the store is not trained again, an
interrupted one continues from its checkpoint in the same MLflow run, and the rest start fresh.
Runs go to processes of their own, ``jobs`` at a time, and each one's CPU time is recorded on
its run (``study.cpu_seconds``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segment.errors import InputError
from segment.study.settings import StudyRun
from segment.tracking.store import TrackingError, store_errors, use_store
from segment.training.checkpoint import CHECKPOINT_FILE

CPU_TAG = "study.cpu_seconds"
FINISHED = "FINISHED"


@dataclass(frozen=True)
class StoredRun:
    run_id: str
    status: str
    cpu_seconds: float
    start_time: int
    epochs: str | None  # the study.epochs tag, set when the run finished


def stored_study_runs(tracking_uri: str | None) -> dict[str, list[StoredRun]]:
    """Every run in the store whose name marks it as a study run, by run name, newest first."""
    import mlflow

    use_store(tracking_uri)
    with store_errors("list the study's runs"):
        frame = mlflow.search_runs(
            search_all_experiments=True,
            filter_string="attributes.run_name LIKE 'study %'",
            output_format="list",
        )
    runs: dict[str, list[StoredRun]] = {}
    for run in sorted(frame, key=lambda r: -r.info.start_time):
        cpu = float(run.data.tags.get(CPU_TAG, 0.0))
        runs.setdefault(run.info.run_name, []).append(
            StoredRun(
                run.info.run_id, run.info.status, cpu, run.info.start_time, run.data.tags.get("study.epochs")
            )
        )
    return runs


def finished_run(stored: dict[str, list[StoredRun]], run: StudyRun) -> StoredRun | None:
    """The newest finished run of ``run``'s name trained for its number of epochs."""
    return next(
        (r for r in stored.get(run.run_name, []) if r.status == FINISHED and r.epochs == str(run.epochs)),
        None,
    )


def task_root(task: str, data_roots: list[Path]) -> Path:
    for root in data_roots:
        if (root / task / "dataset.json").is_file():
            return root
    searched = ", ".join(str(root) for root in data_roots)
    hint = " (convert it first: python data_scripts/isbi2012_to_nifti.py)" if "ISBI" in task else ""
    raise InputError(f"Task {task} is in none of the data roots ({searched}){hint}.")


@dataclass
class _Launch:
    run: StudyRun
    process: subprocess.Popen
    started: float
    resumed: str | None


class StudyTrainer:
    """Trains the missing runs of a study; ``say`` receives one line of progress per event."""

    def __init__(
        self,
        runs: list[StudyRun],
        *,
        configs: Path,
        data_roots: list[Path],
        tracking_uri: str,
        output_dir: Path,
        jobs: int = 2,
        threads: int = 1,
        say: Callable[[str], None] = print,
    ) -> None:
        self.runs, self.configs, self.data_roots = runs, configs, data_roots
        self.tracking_uri, self.output_dir = tracking_uri, output_dir
        self.jobs, self.threads, self.say = jobs, threads, say
        self.failed: list[StudyRun] = []

    def _spec(self, run: StudyRun, stored: dict[str, list[StoredRun]]) -> tuple[dict, str | None]:
        task_config = run.config_path(self.configs)
        from segment.config import load_config

        config = load_config(task_config, run.overrides())
        resumable = next(
            (
                r.run_id
                for r in stored.get(run.run_name, [])
                if r.status != FINISHED and (self.output_dir / r.run_id / CHECKPOINT_FILE).is_file()
            ),
            None,
        )
        spec = {
            "config": str(task_config),
            "overrides": run.overrides(),
            "run_name": run.run_name,
            "tags": run.tags,
            "data_root": str(task_root(config.data.task, self.data_roots)),
            "tracking_uri": self.tracking_uri,
            "output_dir": str(self.output_dir),
            "resume": resumable,
        }
        return spec, resumable

    def _start(self, run: StudyRun, stored: dict[str, list[StoredRun]]) -> _Launch:
        spec, resumed = self._spec(run, stored)
        logs = self.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = open(logs / f"{run.run_name.replace(' ', '_')}.log", "a")  # noqa: SIM115 - the child holds it
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "segment.study.worker", json.dumps(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        log.close()
        return _Launch(run, process, time.monotonic(), resumed)

    def _record_cpu(self, run: StudyRun, cpu_seconds: float) -> None:
        """Add this process's CPU time to the run's total (an interrupted run spans several)."""
        from mlflow import MlflowClient

        latest = stored_study_runs(self.tracking_uri).get(run.run_name)
        if not latest:
            return
        client = MlflowClient()
        with store_errors(f"record the CPU time of {run.run_name}"):
            client.set_tag(latest[0].run_id, CPU_TAG, f"{latest[0].cpu_seconds + cpu_seconds:.1f}")

    def train_missing(self) -> None:
        stored = stored_study_runs(self.tracking_uri)
        todo = [run for run in self.runs if finished_run(stored, run) is None]
        done = len(self.runs) - len(todo)
        self.say(
            f"{done} of {len(self.runs)} study runs already trained; {len(todo)} to train, {self.jobs} at a time."
        )
        running: dict[int, _Launch] = {}
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while todo or running:
                while todo and len(running) < self.jobs:
                    run = todo.pop(0)
                    try:
                        launch = self._start(run, stored)
                    except InputError as error:
                        self.say(f"skipped {run.run_name}: {error}")
                        self.failed.append(run)
                        continue
                    running[launch.process.pid] = launch
                    how = f"resuming run {launch.resumed}" if launch.resumed else "started"
                    self.say(f"{how}: {run.run_name}")
                if not running:
                    break
                pid, status, usage = os.wait4(-1, 0)
                launch = running.pop(pid, None)
                if launch is None:
                    continue
                launch.process.returncode = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
                minutes = (time.monotonic() - launch.started) / 60
                try:
                    self._record_cpu(launch.run, cpu)
                except TrackingError as error:
                    self.say(f"could not record the CPU time: {error}")
                if launch.process.returncode == 0:
                    done += 1
                    self.say(
                        f"[{done}/{len(self.runs)}] trained {launch.run.run_name} in {minutes:.1f} min "
                        f"({cpu / 60:.1f} CPU min)"
                    )
                else:
                    self.failed.append(launch.run)
                    self.say(
                        f"failed (exit {launch.process.returncode}): {launch.run.run_name}; "
                        f"see {self.output_dir / 'logs'}"
                    )
        except KeyboardInterrupt:
            self.say(
                f"Stopping: {len(running)} running trainings save their last epoch; run again to resume."
            )
            for launch in running.values():
                launch.process.send_signal(signal.SIGTERM)
            for launch in running.values():
                launch.process.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
