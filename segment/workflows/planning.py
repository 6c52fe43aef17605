"""``plan``: an experiment config for an MSD-layout task, planned from its own data."""

from __future__ import annotations

from pathlib import Path

from segment.atomic import require_output_file, write_atomically
from segment.data.tasks import locate_task, resolve_data_root
from segment.errors import InputError
from segment.planning.fingerprint import fingerprint
from segment.planning.plan import BUDGETS, Plan, plan_task

__all__ = ["Plan", "plan", "task_location"]


def task_location(task: str | Path, data_root: str | Path | None = None) -> tuple[Path, Path]:
    """(the task folder, the data root that holds it) for a task name under the data root or a
    task folder given by its path."""
    given = Path(task)
    if (given / "dataset.json").is_file():
        return given, given.parent
    root = resolve_data_root(data_root)
    return locate_task(str(task), root), root


def plan(
    task: str | Path,
    *,
    data_root: str | Path | None = None,
    device: str = "auto",
    output: str | Path | None = None,
    progress: bool = True,
) -> Plan:
    """Fingerprint ``task`` (cached beside its data) and plan a config for ``device`` (auto: cuda
    when present, else cpu); with ``output``, write it there as commented YAML, atomically."""
    if output is not None:
        require_output_file(Path(output), "the plan")
    folder, _ = task_location(task, data_root)
    planned = plan_task(fingerprint(folder, progress=progress), _planning_device(device))
    if output is not None:
        text = planned.to_yaml()
        write_atomically(Path(output), lambda temporary: temporary.write_text(text))
    return planned


def _planning_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in BUDGETS:
        raise InputError(f"--device {device}: plan for auto, {' or '.join(BUDGETS)}.")
    return device
