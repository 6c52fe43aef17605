"""The study's figures, one per question, each with its 95 % intervals as error bars."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from segment import plots  # imported first: it selects the headless backend
from segment.study.statistics import Difference, Interval


def _bars(
    axis, names: list[str], differences: list[Difference | None], colour: str, offset: float, label: str
):
    shown = [(i, d) for i, d in enumerate(differences) if d is not None]
    if not shown:
        return
    positions = np.array([i for i, _ in shown]) + offset
    means = np.array([d.mean for _, d in shown])
    errors = np.array([[d.mean - d.low, d.high - d.mean] if d.seeds >= 2 else [0, 0] for _, d in shown]).T
    axis.bar(positions, means, width=0.38, color=colour, label=label)
    axis.errorbar(positions, means, yerr=np.nan_to_num(errors), fmt="none", ecolor="black", capsize=3, lw=1)


def level_changes(
    title: str,
    names: list[str],
    measures: dict[str, tuple[list[Difference | None], list[Difference | None]]],
) -> plt.Figure:
    """One panel per measure: the change when each level's skip is switched off at inference
    (left bar) and when the network is trained without it (right bar)."""
    figure, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 3.8), squeeze=False)
    for axis, (measure, (switched, trained)) in zip(axes[0], measures.items(), strict=True):
        _bars(axis, names, switched, "#4363d8", -0.2, "switched off at inference")
        _bars(axis, names, trained, "#f58231", 0.2, "trained without")
        axis.axhline(0, color="grey", lw=0.8)
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right")
        axis.set_ylabel(f"change in {measure}")
        axis.set_title(measure)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def banded(
    title: str,
    rows: dict[str, list[Difference]],
    bands: list[str],
    xlabel: str,
    ylabel: str,
) -> plt.Figure:
    """For each skip switched off (a row), the change per band (distance or frequency) with
    its interval: where the extra errors lie."""
    figure, axis = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(1, len(rows))
    colours = plots.LABEL_COLOURS
    for index, (name, differences) in enumerate(rows.items()):
        positions = np.arange(len(bands)) + (index - (len(rows) - 1) / 2) * width
        means = np.array([d.mean for d in differences])
        errors = np.array(
            [[d.mean - d.low, d.high - d.mean] if d.seeds >= 2 else [0, 0] for d in differences]
        ).T
        axis.bar(positions, means, width=width, color=colours[index % len(colours)], label=name)
        axis.errorbar(
            positions, means, yerr=np.nan_to_num(errors), fmt="none", ecolor="black", capsize=2, lw=0.8
        )
    axis.axhline(0, color="grey", lw=0.8)
    axis.set_xticks(range(len(bands)), bands)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def gradient_flow(title: str, curves: dict[str, list[Interval]]) -> plt.Figure:
    """The mean gradient norm reaching each encoder level, per training variant."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, (name, intervals) in enumerate(curves.items()):
        levels = np.arange(1, len(intervals) + 1)
        means = np.array([i.mean for i in intervals])
        lows = np.array([i.low if i.seeds >= 2 else i.mean for i in intervals])
        highs = np.array([i.high if i.seeds >= 2 else i.mean for i in intervals])
        colour = plots.LABEL_COLOURS[index % len(plots.LABEL_COLOURS)]
        axis.plot(levels, means, marker="o", color=colour, label=name)
        axis.fill_between(levels, lows, highs, color=colour, alpha=0.2)
    axis.set_yscale("log")
    axis.set_xticks(range(1, 1 + max((len(i) for i in curves.values()), default=0)))
    axis.set_xlabel("encoder level (1 = full resolution)")
    axis.set_ylabel("gradient norm (mean over steps)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _points(axis, figures: list[Interval | Difference | None], colour: str, offset: float, label: str) -> None:
    shown = [(level, f) for level, f in enumerate(figures, start=1) if f is not None]
    if not shown:
        return
    positions = np.array([level for level, _ in shown]) + offset
    means = np.array([f.mean for _, f in shown])
    errors = np.array([[f.mean - f.low, f.high - f.mean] if f.seeds >= 2 else [0, 0] for _, f in shown]).T
    axis.errorbar(
        positions, means, yerr=np.nan_to_num(errors), color=colour, marker="o", capsize=3, lw=1, label=label
    )


def across_settings(rows: dict[str, tuple[list[Difference | None], list[Interval | None]]]) -> plt.Figure:
    """For each setting (a row: the Dice change and the boundary share of each level switched
    off, finest first), the two beside the other settings': how much a skip carries, and how
    close to the boundary its lost voxels lie."""
    figure, (dice_axis, share_axis) = plt.subplots(1, 2, figsize=(11, 5.2))
    spread = 0.08
    for index, (name, (dice, share)) in enumerate(rows.items()):
        colour = plots.LABEL_COLOURS[index % len(plots.LABEL_COLOURS)]
        offset = (index - (len(rows) - 1) / 2) * spread
        _points(dice_axis, dice, colour, offset, name)
        _points(share_axis, share, colour, offset, name)
    levels = max((len(dice) for dice, _ in rows.values()), default=0)
    for axis in (dice_axis, share_axis):
        axis.set_xticks(range(1, levels + 1))
        axis.set_xlabel("level switched off at inference (1 = full resolution)")
    dice_axis.axhline(0, color="grey", lw=0.8)
    dice_axis.set_ylabel("change in Dice")
    dice_axis.set_title("What each skip carries")
    share_axis.set_ylim(-0.03, 1.03)
    share_axis.set_ylabel("share of the lost voxels within 1 voxel of the boundary")
    share_axis.set_title("How close to the boundary it is")
    # Below both panels, where it hides no point however many settings there are.
    handles, labels = share_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.05 + 0.025 * ((len(rows) + 1) // 2), 1, 1))
    return figure
