"""Finding an MSD-layout task on disk, listing its cases, and splitting them reproducibly."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from monai.data import load_decathlon_datalist

from segment.config import ConfigError, DataConfig
from segment.data.msd import TASKS, DataNotFoundError, fetch_task
from segment.io import scan_stem

DATA_ROOT_VARIABLE = "SEGMENT_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("data")


def resolve_data_root(explicit: str | Path | None = None) -> Path:
    """``--data-root`` if given, else ``$SEGMENT_DATA_ROOT``, else ``./data``."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(DATA_ROOT_VARIABLE) or DEFAULT_DATA_ROOT)


def locate_task(task: str, data_root: Path, download: bool = True) -> Path:
    """The folder of ``task`` under ``data_root``, downloading it first when missing and allowed."""
    folder = data_root / task
    if (folder / "dataset.json").is_file():
        return folder
    if download and task in TASKS:
        try:
            return fetch_task(task, data_root)
        except DataNotFoundError as error:
            raise DataNotFoundError(
                f"{task} was not found at {folder} and could not be downloaded: {error} "
                f"Or point --data-root or ${DATA_ROOT_VARIABLE} at the folder that holds {task}/."
            ) from None
    raise DataNotFoundError(
        f"{task} was not found: expected {folder / 'dataset.json'}; point --data-root or "
        f"${DATA_ROOT_VARIABLE} at the folder that holds {task}/ (see README, 'Data')."
    )


@dataclass(frozen=True)
class TaskSplit:
    """The cases of a task, split into training and validation, and what identifies them."""

    folder: Path
    label_names: dict[int, str]
    train: list[dict[str, str]]
    val: list[dict[str, str]]

    @property
    def fingerprint(self) -> str:
        """A short hash of the case list: equal fingerprints mean the same cases and split."""
        digest = hashlib.sha256()
        for tag, cases in (("train", self.train), ("val", self.val)):
            for case in cases:
                digest.update(f"{tag}:{case_id(case)}\n".encode())
        return digest.hexdigest()[:16]

    def as_record(self) -> dict:
        """JSON-ready description of the split, logged with every run."""
        return {
            "task_folder": str(self.folder),
            "fingerprint": self.fingerprint,
            "train": [case_id(c) for c in self.train],
            "val": [case_id(c) for c in self.val],
        }


def case_id(case: dict[str, str]) -> str:
    """``hippocampus_001`` for ``.../imagesTr/hippocampus_001.nii.gz``."""
    return scan_stem(case["image"])


def label_names(task_folder: Path) -> dict[int, str]:
    labels = json.loads((task_folder / "dataset.json").read_text()).get("labels", {})
    return {int(value): str(name) for value, name in labels.items()}


def split_task(config: DataConfig, data_root: Path, download: bool = True) -> TaskSplit:
    """List the labelled cases of the task and split them by ``config.split_seed``: a fraction
    of them, or one fold of ``config.folds``; without a seed, in name order."""
    folder = locate_task(config.task, data_root, download)
    cases = load_decathlon_datalist(
        str(folder / "dataset.json"), is_segmentation=True, data_list_key="training", base_dir=str(folder)
    )
    cases = sorted(cases, key=lambda case: case["image"])
    if config.max_cases is not None:
        cases = cases[: config.max_cases]
    missing = [c[key] for c in cases for key in ("image", "label") if not Path(c[key]).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{folder / 'dataset.json'} lists {len(missing)} files that do not exist, first {missing[0]}; "
            f"the task folder is incomplete."
        )
    shuffled = cases[:]
    if config.split_seed is not None:
        random.Random(config.split_seed).shuffle(shuffled)
    if config.folds is None:
        held_out = max(1, round(len(cases) * config.val_fraction))
        # Unshuffled, the validation cases are the last ones, as MONAI's tutorials take them.
        start = 0 if config.split_seed is not None else len(cases) - held_out
        stop = start + held_out
    elif len(cases) < config.folds:
        raise ConfigError(
            f"data.folds={config.folds} needs at least {config.folds} labelled cases, but {folder.name} "
            f"has {len(cases)}; lower data.folds."
        )
    else:
        # Fold k is the k-th of `folds` contiguous, near-equal runs of the shuffled cases.
        start, stop = (len(cases) * k // config.folds for k in (config.fold, config.fold + 1))
    val = sorted(shuffled[start:stop], key=lambda case: case["image"])
    train = sorted(shuffled[:start] + shuffled[stop:], key=lambda case: case["image"])
    return TaskSplit(folder, label_names(folder), train, val)
