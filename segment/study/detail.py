"""The fine-detail measures of one predicted mask against its truth: where its errors lie
relative to the true boundary, at which spatial scale, how well thin structures survive
(skeleton scores), and surface Dice at tight tolerances.

Each measure is additive over cases where that matters (error counts, energies), so that the
report can difference two skip settings case by case: the voxels a switched-off skip loses are
the extra errors it makes, counted per distance band."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# Lower edges of the distance bands, in voxels of the finest spacing: on the boundary, one,
# two, three to four, five and more voxels away.
DISTANCE_EDGES = (0.0, 1.0, 2.0, 3.0, 5.0)
DISTANCE_BANDS = ("0", "1", "2", "3-4", "5+")
# Surface Dice tolerances, in voxels of the finest spacing (millimetres on the hippocampus).
NSD_TOLERANCES = (0.5, 1.0, 2.0)


def true_boundary(truth: np.ndarray) -> np.ndarray:
    """The voxels of a label map with a differently labelled face neighbour: both sides of
    every boundary, so that a voxel lost just inside and one gained just outside both lie on it."""
    boundary = np.zeros(truth.shape, dtype=bool)
    for axis in range(truth.ndim):
        differs = np.diff(truth, axis=axis) != 0
        before = [slice(None)] * truth.ndim
        after = [slice(None)] * truth.ndim
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        boundary[tuple(before)] |= differs
        boundary[tuple(after)] |= differs
    return boundary


def boundary_distance(truth: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Each voxel's distance to the true boundary, in voxels of the finest spacing (physical
    distance divided by it, so anisotropic scans count in their finest voxels)."""
    boundary = true_boundary(truth)
    if not boundary.any():
        return np.full(truth.shape, np.inf)
    distance = ndimage.distance_transform_edt(~boundary, sampling=spacing)
    return distance / min(spacing)


def error_distance_counts(prediction: np.ndarray, truth: np.ndarray, distance: np.ndarray) -> list[int]:
    """How many wrongly labelled voxels lie in each distance band of ``DISTANCE_EDGES``."""
    wrong = distance[prediction != truth]
    edges = [*DISTANCE_EDGES, np.inf]
    return np.histogram(wrong, bins=edges)[0].astype(int).tolist()


def band_masks(shape: Sequence[int], level_scales: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Partition the discrete Fourier frequencies of a grid of ``shape`` into one band per
    level. Level k sees the volume at ``level_scales[k]`` voxels per sample on each axis, so
    it can represent the frequencies up to 0.5 / scale cycles per voxel on every axis; band k
    holds those it can represent and level k+1 cannot. The coarsest band keeps the rest."""
    frequencies = np.meshgrid(*(np.abs(np.fft.fftfreq(n)) for n in shape), indexing="ij")

    def representable(scales: Sequence[int]) -> np.ndarray:
        inside = np.ones(tuple(shape), dtype=bool)
        for axis, scale in enumerate(scales):
            inside &= frequencies[axis] <= 0.5 / scale + 1e-9
        return inside

    seen = [representable(scales) for scales in level_scales]
    return [seen[k] & ~seen[k + 1] for k in range(len(seen) - 1)] + [seen[-1]]


def band_energies(
    prediction: np.ndarray, truth: np.ndarray, labels: Sequence[int], bands: Sequence[np.ndarray]
) -> list[float]:
    """The energy of the error in each frequency band, summed over the foreground labels: the
    error of label c is its predicted indicator minus its true one, and by Parseval the
    energies of all bands add up to the number of voxels wrong for each label."""
    energies = np.zeros(len(bands))
    for value in labels:
        error = (prediction == value).astype(np.float32) - (truth == value).astype(np.float32)
        if not error.any():
            continue
        power = np.abs(np.fft.fftn(error)) ** 2 / error.size
        energies += [float(power[band].sum()) for band in bands]
    return energies.tolist()


def skeleton_scores(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """clDice (Shit et al. 2021) and skeleton recall of a 2D foreground mask: how much of each
    mask's skeleton lies inside the other. A thin structure broken by the prediction loses
    skeleton recall even when its Dice barely moves."""
    from skimage.morphology import skeletonize

    predicted, expected = prediction > 0, truth > 0
    predicted_skeleton, true_skeleton = skeletonize(predicted), skeletonize(expected)
    precision = (predicted_skeleton & expected).sum() / max(predicted_skeleton.sum(), 1)
    recall = (true_skeleton & predicted).sum() / max(true_skeleton.sum(), 1)
    cldice = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return float(cldice), float(recall)
