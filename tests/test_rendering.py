"""The viewer's pictures: display orientation, crosshair, windows and overlays."""

from __future__ import annotations

import numpy as np
import pytest
from segment.app.rendering import (
    CROSSHAIR_COLOUR,
    GAINED_COLOUR,
    TARGET_PIXELS,
    DisplayVolume,
    Style,
    compose,
    crosshair,
    label_colour,
    outline,
    plane_picture,
    plane_pixel_mm,
    plane_slice,
    window,
)

SHAPE = (5, 6, 7)


def ras_volume_with_marker(position: tuple[int, int, int]) -> np.ndarray:
    volume = np.zeros(SHAPE, dtype=np.float32)
    volume[position] = 1.0
    return volume


def test_lps_and_ras_files_of_one_anatomy_display_identically():
    ras = ras_volume_with_marker((4, 5, 6))
    ras_affine = np.diag([1.0, 2.0, 3.0, 1.0])
    lps_affine = ras_affine @ np.array(
        [[-1, 0, 0, 4], [0, -1, 0, 5], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float
    )
    lps = ras[::-1, ::-1, :]
    shown_ras, shown_lps = (
        DisplayVolume.from_array(ras, ras_affine),
        DisplayVolume.from_array(lps, lps_affine),
    )
    np.testing.assert_array_equal(shown_ras.data, shown_lps.data)
    assert shown_lps.spacing == (1.0, 2.0, 3.0)


def test_permuted_axes_get_their_own_spacing():
    affine = np.zeros((4, 4))
    # File axes stored S (1 mm), A (2 mm), R (3 mm).
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = 3.0, 2.0, 1.0, 1.0
    shown = DisplayVolume.from_array(np.zeros((7, 6, 5)), affine)
    assert shown.data.shape == SHAPE
    assert shown.spacing == (3.0, 2.0, 1.0)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_right_anterior_superior_corner_is_top_left_and_the_crosshair_finds_it(plane):
    corner = (SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1)  # most right, anterior, superior voxel
    volume = ras_volume_with_marker(corner)
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
    picture = plane_slice(volume, plane, corner[axis])
    assert picture[0, 0] == 1.0, "right (or anterior) on the left, superior (or anterior) on top"
    assert crosshair(plane, corner, SHAPE) == (0, 0)
    row, column = crosshair(plane, (1, 2, 3), SHAPE)
    marked = plane_slice(ras_volume_with_marker((1, 2, 3)), plane, (1, 2, 3)[axis])
    assert marked[row, column] == 1.0


def test_pixel_sizes_follow_the_plane():
    assert plane_pixel_mm("axial", (1.0, 2.0, 3.0)) == (2.0, 1.0)
    assert plane_pixel_mm("sagittal", (1.0, 2.0, 3.0)) == (3.0, 2.0)


def test_window_maps_level_and_width_to_grey():
    grey = window(np.array([-100.0, 40.0, 240.0, 1000.0]), level=40.0, width=400.0)
    assert grey.tolist() == [38, 127, 255, 255]


def test_outline_keeps_only_the_border():
    square = np.zeros((6, 6), dtype=bool)
    square[1:5, 1:5] = True
    border = outline(square)
    assert border.sum() == 12
    assert not border[2:4, 2:4].any()


def test_overlay_colours_labels_and_lost_voxels():
    grey = np.full((4, 4), 100, dtype=np.uint8)
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[0, 0] = 1
    lost = np.zeros((4, 4), dtype=bool)
    lost[3, 3] = True
    rgb = compose(grey, labels, opacity=1.0, filled=True, lost=lost)
    assert tuple(rgb[0, 0]) != (100, 100, 100)
    assert tuple(rgb[1, 1]) == (100, 100, 100)
    assert rgb[3, 3, 0] > rgb[3, 3, 2], "lost voxels are drawn red"


def test_the_run_overlay_draws_a_task_with_more_labels_than_the_palette_has_colours():
    from segment.plots import LABEL_COLOURS, label_colour, overlay_panels, released

    names = {value: f"label {value}" for value in range(len(LABEL_COLOURS) + 3)}
    mask = np.arange(64).reshape(8, 8) % len(names)
    with released(
        overlay_panels(np.random.default_rng(0).random((8, 8)), {"prediction": mask}, names)
    ) as figure:
        legend = figure.legends[0]
        assert [text.get_text() for text in legend.get_texts()] == [names[v] for v in range(1, len(names))]
    assert label_colour(len(LABEL_COLOURS) + 1) == label_colour(1)


def test_a_plane_picture_keeps_the_physical_aspect_and_draws_mask_crosshair_and_gained_voxels():
    volume = np.zeros((10, 20, 5), np.float32)  # R, A, S
    display = DisplayVolume.from_array(volume, np.diag([1.0, 1.0, 4.0, 1.0]))
    labels = np.zeros(volume.shape, np.uint8)
    labels[9, 19, 2] = 1  # the right-anterior corner of the axial slice: its top left pixel
    gained = np.zeros(volume.shape, bool)
    gained[0, 0, 2] = True  # left-posterior: bottom right
    style = Style(level=0.5, width=1.0, opacity=1.0, filled=True)
    picture = np.asarray(plane_picture(display, "axial", (4, 9, 2), style, labels=labels, gained=gained))
    assert picture.shape == (TARGET_PIXELS, TARGET_PIXELS // 2, 3), "20 mm by 10 mm"
    assert tuple(picture[0, 0]) == label_colour(1)
    assert tuple(picture[-1, -1]) == tuple(int(0.85 * c) for c in GAINED_COLOUR)
    row = (crosshair("axial", (4, 9, 2), volume.shape)[0] + 0.5) * TARGET_PIXELS / 20
    assert tuple(picture[int(row), 3]) == tuple(int(0.5 * c) for c in CROSSHAIR_COLOUR)
    coronal = plane_picture(display, "coronal", (4, 9, 2), style)
    assert coronal.size == (TARGET_PIXELS // 2, TARGET_PIXELS), "5 slices of 4 mm by 10 mm"
    outlined = np.asarray(
        plane_picture(display, "axial", (4, 9, 2), Style(0.5, 1.0, 1.0, filled=False), labels)
    )
    assert tuple(outlined[0, 0]) == label_colour(1), "a one-voxel region is its own outline"
