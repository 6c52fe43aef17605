"""Training and analysing the study's runs, resumably: a run finished in the store is not
trained again nor an analysed one analysed again, an interrupted training continues from its
checkpoint in the same MLflow run, and the rest start fresh.
Trainings and analyses go to processes of their own, ``jobs`` at a time, and each one's CPU
time is recorded on its run (``study.cpu_seconds``, ``study.analysis_cpu_seconds``)."""

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

CPU_TAG = "study.cpu_seconds"  # training
ANALYSIS_CPU_TAG = "study.analysis_cpu_seconds"
FINISHED = "FINISHED"


@dataclass(frozen=True)
class StoredRun:
    run_id: str
    status: str
    cpu_seconds: float
    analysis_cpu_seconds: float
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
        tags = run.data.tags
        runs.setdefault(run.info.run_name, []).append(
            StoredRun(
                run.info.run_id,
                run.info.status,
                float(tags.get(CPU_TAG, 0.0)),
                float(tags.get(ANALYSIS_CPU_TAG, 0.0)),
                run.info.start_time,
                tags.get("study.epochs"),
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


TRAIN, ANALYSE = "train", "analyse"


@dataclass(frozen=True)
class Job:
    kind: str  # TRAIN or ANALYSE
    run: StudyRun


@dataclass
class _Launch:
    job: Job
    process: subprocess.Popen
    started: float
    resumed: str | None


class StudyRunner:
    """Trains the missing runs of a study and analyses each trained run that has no analysis,
    ``jobs`` processes at a time; a run's analysis is queued first as soon as it is trained.
    ``say`` receives one line of progress per event."""

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

    def _spec(self, job: Job, stored: dict[str, list[StoredRun]]) -> tuple[dict, str | None]:
        run = job.run
        shared = {"kind": job.kind, "tracking_uri": self.tracking_uri}
        if job.kind == ANALYSE:
            found = finished_run(stored, run)
            roots = [str(root) for root in self.data_roots]
            return {**shared, "run_id": found.run_id, "variant": run.variant, "data_roots": roots}, None
        from segment.config import load_config

        task_config = run.config_path(self.configs)
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
            **shared,
            "config": str(task_config),
            "overrides": run.overrides(),
            "run_name": run.run_name,
            "tags": run.tags,
            "data_root": str(task_root(config.data.task, self.data_roots)),
            "output_dir": str(self.output_dir),
            "resume": resumable,
        }
        return spec, resumable

    def _start(self, job: Job, stored: dict[str, list[StoredRun]]) -> _Launch:
        spec, resumed = self._spec(job, stored)
        logs = self.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        name = job.run.run_name.replace(" ", "_") + ("" if job.kind == TRAIN else ".analysis")
        log = open(logs / f"{name}.log", "a")  # noqa: SIM115 - the child holds it
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
        return _Launch(job, process, time.monotonic(), resumed)

    def _record_cpu(self, job: Job, cpu_seconds: float) -> None:
        """Add a process's CPU time to the run's total of its kind (an interrupted training
        spans several processes)."""
        from mlflow import MlflowClient

        latest = stored_study_runs(self.tracking_uri).get(job.run.run_name)
        if not latest:
            return
        tag = CPU_TAG if job.kind == TRAIN else ANALYSIS_CPU_TAG
        spent = latest[0].cpu_seconds if job.kind == TRAIN else latest[0].analysis_cpu_seconds
        with store_errors(f"record the CPU time of {job.run.run_name}"):
            MlflowClient().set_tag(latest[0].run_id, tag, f"{spent + cpu_seconds:.1f}")

    def _queue(self, train: bool) -> tuple[list[Job], int]:
        from segment.study.analysis import has_analysis

        stored = stored_study_runs(self.tracking_uri)
        trained = [run for run in self.runs if finished_run(stored, run) is not None]
        analyses = [
            Job(ANALYSE, run) for run in trained if not has_analysis(finished_run(stored, run).run_id)
        ]
        trainings = [Job(TRAIN, run) for run in self.runs if run not in trained] if train else []
        self.say(
            f"{len(trained)} of {len(self.runs)} study runs already trained; {len(trainings)} to train and "
            f"{len(analyses)} to analyse, {self.jobs} at a time."
        )
        return analyses + trainings, len(trained)

    def run(self, train: bool = True) -> None:
        queue, done = self._queue(train)
        running: dict[int, _Launch] = {}
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while queue or running:
                while queue and len(running) < self.jobs:
                    job = queue.pop(0)
                    try:
                        launch = self._start(job, stored_study_runs(self.tracking_uri))
                    except InputError as error:
                        self.say(f"skipped {job.run.run_name}: {error}")
                        continue
                    running[launch.process.pid] = launch
                    how = "analysing" if job.kind == ANALYSE else "resuming" if launch.resumed else "training"
                    self.say(f"{how}: {job.run.run_name}")
                if not running:
                    break
                pid, status, usage = os.wait4(-1, 0)
                launch = running.pop(pid, None)
                if launch is None:
                    continue
                launch.process.returncode = os.waitstatus_to_exitcode(status)
                job, cpu = launch.job, usage.ru_utime + usage.ru_stime
                minutes = (time.monotonic() - launch.started) / 60
                try:
                    self._record_cpu(job, cpu)
                except TrackingError as error:
                    self.say(f"could not record the CPU time: {error}")
                if launch.process.returncode != 0:
                    self.say(
                        f"failed (exit {launch.process.returncode}) to {job.kind} {job.run.run_name}; "
                        f"see {self.output_dir / 'logs'}"
                    )
                elif job.kind == TRAIN:
                    done += 1
                    queue.insert(0, Job(ANALYSE, job.run))
                    self.say(
                        f"[{done}/{len(self.runs)}] trained {job.run.run_name} in {minutes:.1f} min "
                        f"({cpu / 60:.1f} CPU min)"
                    )
                else:
                    self.say(f"analysed {job.run.run_name} in {minutes:.1f} min")
        except KeyboardInterrupt:
            self.say(
                f"Stopping: {len(running)} running jobs; trainings save their last epoch. Run again to resume."
            )
            for launch in running.values():
                launch.process.send_signal(signal.SIGTERM)
            for launch in running.values():
                launch.process.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
