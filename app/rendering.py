"""Turning volumes and masks into RGB slice pictures: display orientation, intensity windows,
label overlays, crosshairs. Pure numpy (and PIL for the final picture); nothing here knows
about models or Streamlit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import matplotlib
import nibabel as nib
import numpy as np
from PIL import Image

from segment import plots

PLANES = ("axial", "coronal", "sagittal")
# Window presets as (level, width); "auto" uses the 1st-99th percentile of the scan.
CT_PRESETS = {
    "CT soft tissue": (40.0, 400.0),
    "CT lung": (-600.0, 1500.0),
    "CT bone": (300.0, 2000.0),
    "CT brain": (40.0, 80.0),
}
AUTO_PRESET = "percentile auto (MRI and other)"
LOST_COLOUR = (230, 25, 75)
GAINED_COLOUR = (66, 212, 244)
CROSSHAIR_COLOUR = (255, 225, 25)
TARGET_PIXELS = 360  # longest side of a rendered plane
HEAT_COLOURS = matplotlib.colormaps["inferno"]
# Entropy at which the heat map is fully opaque: most voxels are far below it, and the
# unsure ones (borders between labels) reach it, so the grey anatomy stays visible under them.
HEAT_FULL = 0.5


@dataclass(frozen=True)
class DisplayVolume:
    """A volume reoriented to RAS for display only (axes flipped and swapped, never resampled);
    a multi-channel one keeps its channels last, and :meth:`channel` picks the one drawn."""

    data: np.ndarray  # (R, A, S) voxel order, or (R, A, S, C)
    spacing: tuple[float, float, float]
    orientation: np.ndarray  # nibabel orientation that maps the file's axes to RAS

    @classmethod
    def from_array(cls, array: np.ndarray, affine: np.ndarray) -> DisplayVolume:
        orientation = nib.orientations.io_orientation(affine)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        ras_spacing = tuple(float(spacing[int(axis)]) for axis in _inverse_axes(orientation))
        return cls(nib.orientations.apply_orientation(array, orientation), ras_spacing, orientation)

    def same_view(self, array: np.ndarray) -> np.ndarray:
        """Reorient another array of the scan's grid (a mask) exactly like the scan."""
        return nib.orientations.apply_orientation(array, self.orientation)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (R, A, S) grid, whatever the channels."""
        return tuple(self.data.shape[:3])

    def channel(self, index: int) -> DisplayVolume:
        """The volume of channel ``index`` alone (a one-channel volume is its own channel 0)."""
        if self.data.ndim == 3:
            return self
        return DisplayVolume(self.data[..., index], self.spacing, self.orientation)


def _inverse_axes(orientation: np.ndarray) -> list[int]:
    """For each RAS axis, the file axis that feeds it."""
    axes = [0, 0, 0]
    for file_axis, (ras_axis, _) in enumerate(orientation):
        axes[int(ras_axis)] = file_axis
    return axes


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice in radiological convention: patient right on screen left, anterior or
    superior at the top. volume is in RAS voxel order."""
    if plane == "axial":
        return volume[::-1, ::-1, index].T  # rows anterior -> posterior, columns right -> left
    if plane == "coronal":
        return volume[::-1, index, ::-1].T  # rows superior -> inferior, columns right -> left
    return volume[index, ::-1, ::-1].T  # rows superior -> inferior, columns anterior -> posterior


def plane_axis(plane: str) -> int:
    return {"axial": 2, "coronal": 1, "sagittal": 0}[plane]


def crosshair(plane: str, position: tuple[int, int, int], shape: tuple[int, int, int]) -> tuple[int, int]:
    """(row, column) in :func:`plane_slice`'s picture where the other two planes cross."""
    x, y, z = position
    if plane == "axial":
        return shape[1] - 1 - y, shape[0] - 1 - x
    if plane == "coronal":
        return shape[2] - 1 - z, shape[0] - 1 - x
    return shape[2] - 1 - z, shape[1] - 1 - y


def window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map intensities to uint8 grey through a level/width window."""
    low = level - width / 2.0
    scaled = (image.astype(np.float32) - low) / max(width, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def auto_window(volume: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(volume, [1, 99])
    return float((low + high) / 2), float(max(high - low, 1e-3))


def channel_windows(array: np.ndarray) -> tuple[tuple[float, float], ...]:
    """:func:`auto_window` of each channel of an (X, Y, Z) or (X, Y, Z, C) array: a multi-modal
    scan's sequences have unrelated intensities."""
    channels = [array] if array.ndim == 3 else [array[..., index] for index in range(array.shape[3])]
    return tuple(auto_window(channel) for channel in channels)


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def label_colour(value: int) -> tuple[int, int, int]:
    return _hex_rgb(plots.label_colour(value))


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{channel:02x}" for channel in rgb)


def rgb_colour(colour: str) -> tuple[int, int, int]:
    """``#rrggbb`` (what a colour picker gives) -> (r, g, b)."""
    return _hex_rgb(colour)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1, mode="constant")
    inner = padded[1:-1, :-2] & padded[1:-1, 2:] & padded[:-2, 1:-1] & padded[2:, 1:-1]
    return mask & ~inner


def paint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int], opacity: float) -> None:
    rgb[where] = (1.0 - opacity) * rgb[where] + opacity * np.asarray(colour, dtype=np.float32)


def paint_heat(rgb: np.ndarray, heat: np.ndarray) -> None:
    """Blend a heat map of values in [0, 1] over ``rgb``: transparent at 0, opaque from
    :data:`HEAT_FULL`."""
    colours = HEAT_COLOURS(np.clip(heat / HEAT_FULL, 0.0, 1.0))[..., :3] * 255.0
    alpha = np.clip(heat / HEAT_FULL, 0.0, 1.0)[..., None]
    rgb[:] = (1.0 - alpha) * rgb + alpha * colours


def compose(
    grey: np.ndarray,
    labels: np.ndarray | None,
    opacity: float,
    filled: bool,
    cross: tuple[int, int] | None = None,
    lost: np.ndarray | None = None,
    gained: np.ndarray | None = None,
    heat: np.ndarray | None = None,
    colours: Mapping[int, tuple[int, int, int]] | None = None,
    hidden: frozenset[int] = frozenset(),
) -> np.ndarray:
    """An RGB uint8 picture: the grey slice, a heat map, coloured labels (filled or outlined;
    ``colours`` replace the default of a label, ``hidden`` ones are left out), lost and gained
    voxels, and the crosshair."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if heat is not None:
        paint_heat(rgb, heat)
    if labels is not None:
        for value in np.unique(labels):
            if value == 0 or int(value) in hidden:
                continue
            region = labels == value
            paint(
                rgb,
                region if filled else outline(region),
                (colours or {}).get(int(value)) or label_colour(int(value)),
                opacity if filled else 1.0,
            )
    for changed, colour in ((lost, LOST_COLOUR), (gained, GAINED_COLOUR)):
        if changed is not None:
            paint(rgb, changed, colour, 0.85)
    if cross is not None:
        row, column = cross
        rgb[row, :] = 0.5 * rgb[row, :] + 0.5 * np.asarray(CROSSHAIR_COLOUR)
        rgb[:, column] = 0.5 * rgb[:, column] + 0.5 * np.asarray(CROSSHAIR_COLOUR)
    return rgb.astype(np.uint8)


def display_size(shape: tuple[int, int], pixel_mm: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in screen pixels keeping the physical aspect ratio of the slice."""
    height_mm, width_mm = shape[0] * pixel_mm[0], shape[1] * pixel_mm[1]
    scale = TARGET_PIXELS / max(height_mm, width_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def plane_pixel_mm(plane: str, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """(row, column) pixel size in mm of :func:`plane_slice`'s picture."""
    sx, sy, sz = spacing
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


@dataclass(frozen=True)
class Style:
    """How a slice is drawn: the intensity window and the mask overlay."""

    level: float
    width: float
    opacity: float = 0.45
    filled: bool = True  # else outlined
    colours: Mapping[int, tuple[int, int, int]] = field(default_factory=dict)  # per label, else the default
    hidden: frozenset[int] = frozenset()  # labels not drawn


def plane_picture(
    display: DisplayVolume,
    plane: str,
    position: tuple[int, int, int],
    style: Style,
    labels: np.ndarray | None = None,
    lost: np.ndarray | None = None,
    gained: np.ndarray | None = None,
    heat: np.ndarray | None = None,
) -> Image.Image:
    """One plane of ``display`` at ``position`` (RAS voxel indices) with the crosshair, the
    labels, the lost and gained voxels and a heat map (arrays already in
    :meth:`DisplayVolume.same_view`), scaled to its physical aspect ratio."""
    index = position[plane_axis(plane)]

    def cut(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else plane_slice(array, plane, index)

    grey = window(plane_slice(display.data, plane, index), style.level, style.width)
    picture = compose(
        grey,
        cut(labels),
        style.opacity,
        style.filled,
        crosshair(plane, position, display.shape),
        cut(lost),
        cut(gained),
        cut(heat),
        style.colours,
        style.hidden,
    )
    size = display_size(grey.shape, plane_pixel_mm(plane, display.spacing))
    return Image.fromarray(picture).resize(size, Image.NEAREST)
