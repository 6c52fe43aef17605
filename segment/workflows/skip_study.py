"""``run_study``: the skip study trained, analysed and reported, resuming wherever it stopped;
``study_progress``: how far it has got."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from segment.data.tasks import resolve_data_root
from segment.errors import InputError
from segment.study.analysis import has_analysis
from segment.study.runner import StudyRunner, finished_run, stored_study_runs
from segment.study.settings import StudyRun, study_runs

DEFAULT_SEEDS = 3
DEFAULT_EPOCHS = 20


@dataclass(frozen=True)
class StudyProgress:
    runs: list[StudyRun]
    trained: list[StudyRun]
    analysed: int
    cpu_seconds: float  # training and analysis, over every stored study run, finished or not
    seconds_per_run: float | None  # the finished runs' mean training and analysis CPU time

    def to_text(self) -> str:
        lines = [
            f"{len(self.trained)} of {len(self.runs)} study runs trained, {self.analysed} analysed; "
            f"{self.cpu_seconds / 3600:.1f} CPU hours spent."
        ]
        left = len(self.runs) - len(self.trained)
        if left and self.seconds_per_run:
            lines.append(
                f"About {left * self.seconds_per_run / 3600:.1f} CPU hours to go, at the finished runs' "
                f"mean of {self.seconds_per_run / 60:.0f} CPU minutes each."
            )
        by_setting: dict[str, list[int]] = {}
        for run in self.runs:
            counts = by_setting.setdefault(run.setting.name, [0, 0])
            counts[0] += run in self.trained
            counts[1] += 1
        lines += [f"  {name}: {done} of {total}" for name, (done, total) in by_setting.items()]
        return "\n".join(lines)


def _data_roots(given: list[Path] | None) -> list[Path]:
    # The shared data (hippocampus) and the project's converted tasks (EM) usually live apart.
    return list(given) if given else list(dict.fromkeys([resolve_data_root(None), Path("data")]))


def study_progress(
    seeds: int = DEFAULT_SEEDS,
    epochs: int = DEFAULT_EPOCHS,
    settings: list[str] | None = None,
    tracking_uri: str | None = None,
    configs: Path = Path("configs"),
    extra: list[str] | None = None,
) -> StudyProgress:
    runs = study_runs(seeds, epochs, settings, configs, extra or ())
    stored = stored_study_runs(tracking_uri)
    finished = [(run, found) for run in runs if (found := finished_run(stored, run)) is not None]
    analysed = sum(has_analysis(found.run_id) for _, found in finished)
    cpu = sum(r.cpu_seconds + r.analysis_cpu_seconds for versions in stored.values() for r in versions)
    per_run = [found.cpu_seconds + found.analysis_cpu_seconds for _, found in finished]
    mean = sum(per_run) / len(per_run) if per_run else None
    return StudyProgress(runs, [run for run, _ in finished], analysed, cpu, mean)


def run_study(
    seeds: int = DEFAULT_SEEDS,
    epochs: int = DEFAULT_EPOCHS,
    settings: list[str] | None = None,
    *,
    configs: Path = Path("configs"),
    extra: list[str] | None = None,
    data_roots: list[Path] | None = None,
    tracking_uri: str | None = None,
    output_dir: Path = Path("study"),
    jobs: int = 2,
    threads: int = 1,
    train: bool = True,
    report: Path | None = None,
    say: Callable[[str], None] = print,
) -> StudyProgress:
    """Train every run of the study that the store does not hold finished (``seeds`` seeds of
    each setting and variant, ``epochs`` epochs each; an interrupted run resumes from its
    checkpoint), analyse every trained run not analysed yet, and write the report to
    ``report``. ``settings`` limits it to those settings' names; ``train=False`` only analyses
    and reports what is trained. ``extra`` overrides apply to every run (and name it)."""
    runs = study_runs(seeds, epochs, settings, configs, extra or ())
    roots = _data_roots(data_roots)
    with _only_runner(output_dir):
        StudyRunner(
            runs,
            configs=configs,
            data_roots=roots,
            tracking_uri=tracking_uri,
            output_dir=output_dir / "runs",
            jobs=jobs,
            threads=threads,
            say=say,
        ).run(train)
        if report is not None:
            write_study_report(report, tracking_uri)
            say(f"Wrote {report}")
    return study_progress(seeds, epochs, settings, tracking_uri, configs, extra)


@contextmanager
def _only_runner(output_dir: Path) -> Iterator[None]:
    """Two runners on one study would train the same runs twice."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "study.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"Another `segment study` is running on {output_dir}; wait for it, or stop it (make study-stop)."
            ) from None
        yield


def has_study(tracking_uri: str | None = None) -> bool:
    """Whether the store holds any trained study run."""
    return any(
        run.status == "FINISHED" for versions in stored_study_runs(tracking_uri).values() for run in versions
    )


def write_study_report(output: Path, tracking_uri: str | None = None) -> str:
    """The study report from MLflow, as Markdown at ``output`` with its figures beside it."""
    from segment.study.report import study_report
    from segment.study.results import collect

    results = collect(tracking_uri)
    if not results:
        raise InputError(
            "The store holds no analysed study runs yet: run `segment study` (or `make study`) first."
        )
    return study_report(results, output)
