"""What the viewer page shows, computed without Streamlit: the model choices, the skip switches
and their labels, the second model to compare with, the display choices, the mask summary and
what one session keeps for its scan (uploads are :mod:`segment.app.uploads`'). Levels are counted from 1 in everything a user sees,
widget keys included. The numbers shown for a mask are :mod:`segment.app.metrics_table`'s.

The page (:mod:`segment.app.viewer`) reads widgets and calls these; each is a plain function or
a small class that the unit tests call directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import numpy as np
from segment.app.metrics_table import PeerMask
from segment.app.rendering import (
    AUTO_PRESET,
    CT_PRESETS,
    GAINED_COLOUR,
    LOST_COLOUR,
    PLANES,
    DisplayVolume,
    label_colour,
    plane_axis,
)

from segment.config import ExperimentConfig
from segment.engine.skip_explorer import MaskChange, SkipExplorer, UncertaintyMap
from segment.io import Scan
from segment.tracking.runs import RegisteredModel, trained_without

SKIP_KEY = "skip_level_{level}"  # one switch per long skip, level counted from 1
T = TypeVar("T")


# --- models -------------------------------------------------------------------------------------


def model_choices(
    bundled: Iterable[str], registered: Sequence[RegisteredModel], members: Iterable[str] = ()
) -> dict[str, str]:
    """Display name -> model spec: bundled models first, the members of bundled ensembles
    (``hippocampus_3d/member_1``), then MLflow's registered models."""
    choices = {f"{name} (bundled)": name for name in bundled}
    choices |= {f"{name} (bundled ensemble member)": name for name in members}
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


NO_COMPARISON = "none"


def compare_choices(choices: Iterable[str], current: str) -> list[str]:
    """What the "Compare with" picker offers: nothing, or any model but the one shown."""
    return [NO_COMPARISON, *(choice for choice in choices if choice != current)]


def incomparable(config: ExperimentConfig, other: ExperimentConfig) -> str | None:
    """Why two models' masks cannot be compared voxel for voxel (their labels differ), or None."""
    if dict(config.label_names) == dict(other.label_names):
        return None
    return (
        f"{other.name} labels {label_summary(other.label_names)}, not {label_summary(config.label_names)} "
        f"as {config.name} does; compare two models of one task."
    )


def label_summary(label_names: Mapping[int, str]) -> str:
    return ", ".join(f"{value} {name}" for value, name in sorted(label_names.items()) if value > 0)


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
    """``level 1 - full resolution, 1 mm`` ... for each long skip, in the scan's unit: the
    voxel size of that level per axis, or one size when all axes agree. A level pooled more
    along some axes than others (``model.pooling``) is named by its largest factor:
    ``level 2 - 1/2 resolution, 1.2 x 1.2 x 3.6 mm``."""
    # A 2D model pools within the axial slice only.
    spacing = (config.data.spacing or scan.spacing)[: config.model.spatial_dims]
    labels = []
    for level, scales in enumerate(config.model.level_scales[:-1], start=1):
        sizes = [s * scale for s, scale in zip(spacing, scales, strict=True)]
        size = " x ".join(f"{s:g}" for s in sizes) if len(set(sizes)) > 1 else f"{sizes[0]:g}"
        scale = "full resolution" if level == 1 else f"1/{max(scales)} resolution"
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


# --- one session's values ---------------------------------------------------------------------


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


def channel_choices(config: ExperimentConfig) -> list[str]:
    """The "Channel shown" options: the model's channel names (its task's modalities) when its
    config records one per input, else ``channel 1``, ``channel 2``..."""
    names = config.data.channel_names
    if names is not None and len(names) == config.model.in_channels:
        return list(names)
    return [f"channel {index}" for index in range(1, config.model.in_channels + 1)]


def visible_planes(shape: Sequence[int]) -> list[str]:
    """The planes worth showing: a single 2D slice (an EM image) has one, a volume three."""
    return [
        plane
        for plane in PLANES
        if all(size > 1 for axis, size in enumerate(shape) if axis != plane_axis(plane))
    ] or list(PLANES)


def legend_html(
    label_names: Mapping[int, str],
    colours: Mapping[int, tuple[int, int, int]] | None = None,
    hidden: frozenset[int] = frozenset(),
) -> str:
    """Each shown label's name after a square of its colour (the user's, else the default)."""
    return " ".join(
        f"<span style='color:rgb{(colours or {}).get(value) or label_colour(value)}'>&#9632;</span> {name}"
        for value, name in sorted(label_names.items())
        if value > 0 and value not in hidden
    )


def mask_summary(
    skip_mask: Sequence[bool],
    label_names: Mapping[int, str],
    colours: Mapping[int, tuple[int, int, int]] | None = None,
    hidden: frozenset[int] = frozenset(),
) -> str:
    """The line above the mask pictures: its skip mask and the label colours (HTML)."""
    return f"**Mask** (skips {mask_text(skip_mask)}): {legend_html(label_names, colours, hidden)}"


def difference_legend(shown: str, compared: str) -> str:
    """The line above the pictures of the voxels where two models' masks differ (HTML)."""
    return (
        f"**Where the two differ**: <span style='color:rgb{LOST_COLOUR}'>&#9632;</span> labelled by {shown} "
        f"only (or otherwise); <span style='color:rgb{GAINED_COLOUR}'>&#9632;</span> labelled by {compared} "
        "only (or otherwise)."
    )


UNCERTAINTY_LEGEND = (
    "**Uncertainty**: the entropy of the mean softmax over the model's samples, from transparent "
    "(certain) through purple to yellow (half the largest entropy possible, and above)."
)


LOST_LEGEND = (
    "**Lost detail**: <span style='color:rgb(230,25,75)'>&#9632;</span> labelled with every skip on, not now; "
    "<span style='color:rgb(66,212,244)'>&#9632;</span> labelled now, not with every skip on."
)


# --- one session's case -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What one session keeps for its scan and model: the explorer (encoder output and every
    mask cached), and the display orientation and auto window of each channel, which depend on
    the scan only."""

    explorer: SkipExplorer
    display: DisplayVolume
    auto_windows: tuple[tuple[float, float], ...]  # one per channel


@dataclass(frozen=True)
class Extras:
    """What is shown beside the mask, each when asked for: the model trained without the
    switched-off skips, a second model compared, the uncertainty map."""

    peer: PeerMask | None
    compared: PeerMask | None
    uncertainty: UncertaintyMap | None


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
