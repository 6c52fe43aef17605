"""Figures logged with runs: learning curves and validation overlays."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # runs headless: on servers, in CI and in worker processes

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

if TYPE_CHECKING:
    from segment.workflows.evaluation import AblationRow

LABEL_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"]


@contextmanager
def released(figure: plt.Figure) -> Iterator[plt.Figure]:
    """``figure``, closed afterwards: pyplot keeps every figure alive until it is closed."""
    try:
        yield figure
    finally:
        plt.close(figure)


def label_colour(value: int) -> str:
    """The colour of label ``value`` (1, 2, ...); tasks with more labels reuse the palette."""
    return LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]


def learning_curves(history: dict[str, list[tuple[int, float]]]) -> plt.Figure:
    """history: metric name -> [(epoch, value)]; losses on the left, Dice on the right."""
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in history.items():
        if not points:
            continue
        epochs, values = zip(*points, strict=True)
        axis = loss_axis if "loss" in name else dice_axis
        axis.plot(epochs, values, label=name, marker="." if len(points) < 30 else None)
    loss_axis.set(title="training loss", xlabel="epoch")
    dice_axis.set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def busiest_slice(label: np.ndarray) -> int:
    """Index along the last axis of the slice with the most labelled voxels."""
    return int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(axis=0)))


def overlay_panels(
    image: np.ndarray, masks: dict[str, np.ndarray], label_names: dict[int, str]
) -> plt.Figure:
    """image: (H, W) slice; masks: title -> (H, W) integer labels. One panel per entry plus the
    bare image, each mask drawn in per-label colours over the image."""
    colours = ListedColormap(["none", *(label_colour(value) for value in range(1, max(label_names) + 1))])
    figure, axes = plt.subplots(1, len(masks) + 1, figsize=(3.2 * (len(masks) + 1), 3.6))
    low, high = np.percentile(image, [1, 99])
    for axis, (title, mask) in zip(axes, [("image", None), *masks.items()], strict=True):
        # Rows of the display are the second array axis so anatomy appears upright.
        axis.imshow(image.T, cmap="gray", vmin=low, vmax=high, origin="lower")
        if mask is not None:
            shown = np.ma.masked_equal(mask.T, 0)
            axis.imshow(
                shown,
                cmap=colours,
                vmin=0,
                vmax=max(label_names),
                alpha=0.55,
                origin="lower",
                interpolation="nearest",
            )
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    handles = [
        matplotlib.patches.Patch(color=label_colour(value), label=name)
        for value, name in sorted(label_names.items())
        if value > 0
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    return figure


def ablation_bars(rows: list[AblationRow]) -> plt.Figure:
    """Mean Dice per skip mask (e.g. ``1111``, ``0111``, ...), as a bar chart."""
    names = [row.mask_text for row in rows]
    values = [row.mean_dice for row in rows]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 2), 3.5))
    bars = axis.bar(names, values, color=["#4363d8" if set(n) == {"1"} else "#f58231" for n in names])
    axis.bar_label(bars, fmt="%.3f", fontsize=8)
    axis.set(ylim=(0, 1), ylabel="mean Dice", xlabel="skip mask: long skips on (1) / off (0), level 1 first")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure
