"""What the viewer page shows, computed without Streamlit: the model choices, the skip switches
and their labels, uploads read under names we choose, the display choices, the mask summary
and what one session keeps for its scan. Levels are counted from 1 in everything a user sees,
widget keys included. The numbers shown for a mask are :mod:`segment.app.metrics_table`'s.

The page (:mod:`segment.app.viewer`) reads widgets and calls these; each is a plain function or
a small class that the unit tests call directly.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

import numpy as np
from segment.app.rendering import AUTO_PRESET, CT_PRESETS, PLANES, DisplayVolume, label_colour, plane_axis

from segment.config import ExperimentConfig
from segment.engine.skip_explorer import MaskChange, SkipExplorer
from segment.io import Scan, ScanError, read_scan
from segment.tracking.runs import RegisteredModel, trained_without

NIFTI_NAMES = (".nii", ".nii.gz")
SKIP_KEY = "skip_level_{level}"  # one switch per long skip, level counted from 1
T = TypeVar("T")


# --- models -------------------------------------------------------------------------------------


def model_choices(bundled: Iterable[str], registered: Sequence[RegisteredModel]) -> dict[str, str]:
    """Display name -> model spec: bundled models first, then MLflow's registered models."""
    choices = {f"{name} (bundled)": name for name in bundled}
    choices |= {model.title: model.uri for model in registered}
    return choices


@dataclass(frozen=True)
class Notice:
    kind: Literal["info", "success", "warning"]
    text: str


def training_notice(config: ExperimentConfig) -> Notice:
    """What switching a skip off means for this model, given how it was trained."""
    built = config.model.long_skips
    dropout = max(config.model.skip_dropout_per_level)
    if built is not None and not all(built):
        return Notice(
            "info", "This model was trained without some long skips; its switches start in that state."
        )
    if dropout > 0:
        return Notice(
            "success",
            f"Trained with skip dropout {dropout:g}: switching skips off stays close to what it saw in training.",
        )
    return Notice(
        "warning",
        "Trained without skip dropout: a switched-off skip feeds the decoder zeros it never saw, "
        "so the loss shown exaggerates what the skip carries.",
    )


def mask_text(skip_mask: Sequence[bool]) -> str:
    """``(True, False, True)`` -> ``101``, finest level first."""
    return "".join(str(int(flag)) for flag in skip_mask)


def peer_for(
    registered: Sequence[RegisteredModel],
    config: ExperimentConfig,
    skip_mask: Sequence[bool],
    built: Sequence[bool],
) -> RegisteredModel | None:
    """The registered model built with exactly the long skips ``skip_mask`` leaves on, the fair
    comparison for switched-off skips; None when it is the model's own mask or none was."""
    if tuple(skip_mask) == tuple(built):
        return None
    peers = trained_without(
        list(registered), config.data.task, config.model.spatial_dims, tuple(int(s) for s in skip_mask)
    )
    return peers[0] if peers else None


def train_without_hint(skip_mask: Sequence[bool]) -> str:
    return (
        "No registered model was trained without these skips; train one with "
        f"`--set model.long_skips=[{','.join(str(int(s)) for s in skip_mask)}] model.skip_dropout=0`."
    )


# --- skips --------------------------------------------------------------------------------------


def skip_key(level: int) -> str:
    """The widget key of long skip ``level`` (1 = full resolution)."""
    if level < 1:
        raise ValueError(f"levels are counted from 1, got {level}")
    return SKIP_KEY.format(level=level)


def level_labels(config: ExperimentConfig, scan: Scan) -> list[str]:
    """``level 1 - full resolution, 1 mm`` ... for each long skip, in the scan's unit."""
    # A 2D model pools within the axial slice only.
    spacing = (config.data.spacing or scan.spacing)[: config.model.spatial_dims]
    labels = []
    for level in range(1, config.model.levels):
        factor = 2 ** (level - 1)
        size = (
            " x ".join(f"{s * factor:g}" for s in spacing)
            if len(set(spacing)) > 1
            else f"{spacing[0] * factor:g}"
        )
        scale = "full resolution" if level == 1 else f"1/{factor} resolution"
        labels.append(f"level {level} - {scale}, {size} {scan.unit}")
    return labels


@dataclass(frozen=True)
class SkipSwitch:
    level: int  # from 1, finest first
    key: str
    label: str
    on: bool  # how it starts: as the model was built


def skip_switches(config: ExperimentConfig, scan: Scan, built: Sequence[bool]) -> list[SkipSwitch]:
    """One switch per long skip, finest first, each starting as the model was built."""
    labels = level_labels(config, scan)
    if len(labels) != len(built):
        raise ValueError(f"{len(labels)} levels with a long skip but a skip mask of {len(built)}")
    return [
        SkipSwitch(level, skip_key(level), label, bool(on))
        for level, (label, on) in enumerate(zip(labels, built, strict=True), start=1)
    ]


# --- uploads ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """An uploaded file read as a scan. ``name`` is what the browser sent: it is shown in
    messages and never used as a path; ``scan.path`` is the name we chose (in a folder since
    removed)."""

    name: str
    digest: str
    scan: Scan


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_upload(name: str, data: bytes, what: str) -> Upload:
    """Read uploaded bytes as a scan, written under a name we choose (``<what>.nii[.gz]``);
    ScanError, naming the upload, when they are not a usable NIfTI file."""
    lowered = name.lower()
    if not lowered.endswith(NIFTI_NAMES):
        raise ScanError(f"The {what} {name!r} is not a NIfTI file; upload .nii or .nii.gz.")
    suffix = ".nii.gz" if lowered.endswith(".nii.gz") else ".nii"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{what}{suffix}"
        path.write_bytes(data)
        try:
            scan = read_scan(path)
        except ScanError as error:
            # The message should name the file the user chose, not our temporary copy.
            raise ScanError(str(error).replace(path.name, name)) from None
    return Upload(name, digest(data), scan)


def upload_names(message: str, *uploads: Upload | None) -> str:
    """``message`` with our names for the uploads' files replaced by the names they were
    uploaded under, in one pass (an upload name may contain another file's name)."""
    names = {upload.scan.path.name: upload.name for upload in uploads if upload is not None}
    if not names:
        return message
    pattern = "|".join(re.escape(ours) for ours in sorted(names, key=len, reverse=True))
    return re.sub(pattern, lambda match: names[match.group(0)], message)


class Slot(Generic[T]):
    """One value kept under one key (a scan's digest, a model spec): asking with another key
    builds a new value and forgets the old. A failed build keeps the old value."""

    def __init__(self) -> None:
        self.key: object = None
        self.value: T | None = None
        self.filled = False

    def get(self, key: object, build: Callable[[], T]) -> T:
        if not self.filled or self.key != key:
            value = build()
            self.key, self.value, self.filled = key, value, True
        return self.value


# --- display ------------------------------------------------------------------------------------


def window_presets() -> list[str]:
    return [AUTO_PRESET, *CT_PRESETS]


def default_preset(config: ExperimentConfig) -> int:
    """Index in :func:`window_presets`: CT soft tissue for a CT model, else the auto window."""
    return 1 if config.data.modality == "ct" else 0


def preset_window(preset: str, auto: tuple[float, float]) -> tuple[float, float]:
    """(level, width) of a preset; ``auto`` (the scan's percentile window) for the auto one."""
    return CT_PRESETS.get(preset, auto)


def visible_planes(shape: Sequence[int]) -> list[str]:
    """The planes worth showing: a single 2D slice (an EM image) has one, a volume three."""
    return [
        plane
        for plane in PLANES
        if all(size > 1 for axis, size in enumerate(shape) if axis != plane_axis(plane))
    ] or list(PLANES)


def legend_html(label_names: Mapping[int, str]) -> str:
    return " ".join(
        f"<span style='color:rgb{label_colour(value)}'>&#9632;</span> {name}"
        for value, name in sorted(label_names.items())
        if value > 0
    )


def mask_summary(skip_mask: Sequence[bool], label_names: Mapping[int, str]) -> str:
    """The line above the mask pictures: its skip mask and the label colours (HTML)."""
    return f"**Mask** (skips {mask_text(skip_mask)}): {legend_html(label_names)}"


LOST_LEGEND = (
    "**Lost detail**: <span style='color:rgb(230,25,75)'>&#9632;</span> labelled with every skip on, not now; "
    "<span style='color:rgb(66,212,244)'>&#9632;</span> labelled now, not with every skip on."
)


# --- one session's case -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What one session keeps for its scan and model: the explorer (encoder output and every
    mask cached), and the display orientation and auto window, which depend on the scan only."""

    explorer: SkipExplorer
    display: DisplayVolume
    auto_window: tuple[float, float]


@dataclass(frozen=True)
class Outcome:
    """The masks of the current skip mask and what they are compared with."""

    skip_mask: tuple[bool, ...]
    built: tuple[bool, ...]
    mask: np.ndarray
    reference: np.ndarray
    change: MaskChange

    @property
    def switched(self) -> bool:
        return self.skip_mask != self.built
