"""A 3D view of a label mask: one closed surface per label, in the scan's RAS millimetres.

Each label's surface is the 0.5 level set of its binary mask, found by marching cubes on the
label's bounding box padded with background, so a label touching the edge of the volume still
gives a closed surface. Vertices go through the scan's voxel -> RAS affine, so an oblique,
anisotropic or LPS scan looks as it lies in the patient. A figure a browser draws smoothly holds
a few tens of thousands of triangles: a label whose surface would exceed its share of
``max_triangles`` is sampled at a coarser marching-cubes step (a coarse surface can reach up to
half a step beyond the label).

A mask of one slice (a 2D scan, held as (X, Y, 1)) has no volume to show: the figure carries a
note saying so instead of an extruded slab that would suggest a thickness the scan does not have.
A mask with no labelled voxels, or with all its labels hidden, gets a note too. Pure numpy,
scipy, scikit-image and plotly; nothing here knows about Streamlit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import plotly.graph_objects as go
from nibabel.affines import apply_affine
from scipy import ndimage
from skimage.measure import marching_cubes

from segment import plots

EMPTY_NOTE = "No labelled voxels to show."
SLICE_NOTE = "A 3D view needs a volume; this scan is a single slice."
# Marching cubes on a binary mask gives about two triangles per exposed voxel face.
TRIANGLES_PER_FACE = 2.0
# Enough ambient light that the side away from the light still reads, and specular highlights
# that show curvature.
LIGHTING = {"ambient": 0.35, "diffuse": 0.8, "specular": 0.35, "roughness": 0.5, "fresnel": 0.2}
LIGHT_POSITION = {"x": 1000, "y": 1000, "z": 2000}


def label_surfaces(
    mask: np.ndarray,
    affine: np.ndarray,
    label_names: Mapping[int, str],
    colours: Mapping[int, str] | None = None,
    visible: Iterable[int] | None = None,
    max_triangles: int = 60_000,
    unit: str = "mm",
) -> go.Figure:
    """One ``go.Mesh3d`` per non-background label of ``mask`` (in ``visible``, all when None),
    named by ``label_names`` and coloured by ``colours`` (hex; the label's default colour
    otherwise), in RAS ``unit`` through ``affine``; a note instead when there is nothing to show."""
    if mask.ndim != 3 or min(mask.shape) < 2:
        return _note(SLICE_NOTE, unit)
    labels = _integer_labels(mask)
    boxes = {value: box for value, box in enumerate(ndimage.find_objects(labels), start=1) if box}
    shown = sorted(boxes if visible is None else set(boxes) & {int(value) for value in visible})
    if not shown:
        return _note(EMPTY_NOTE, unit)
    share = max(1, max_triangles // len(shown))
    colours = colours or {}
    figure = _empty_figure(unit)
    for value in shown:
        vertices, faces = _surface(labels[boxes[value]] == value, share)
        corner = np.array([part.start for part in boxes[value]], dtype=np.float64)
        figure.add_trace(
            _mesh(
                apply_affine(affine, vertices + corner),
                faces,
                label_names.get(value, f"label {value}"),
                colours.get(value, plots.label_colour(value)),
            )
        )
    return figure


def _integer_labels(mask: np.ndarray) -> np.ndarray:
    """``mask`` as integers (scans are read as float32); integer masks are used as they are."""
    if np.issubdtype(mask.dtype, np.integer):
        return mask
    return np.rint(mask).astype(np.int32)


def _surface(binary: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (in ``binary``'s voxel indices) and triangles of the closed surface around
    ``binary``, at the finest marching-cubes step that stays within ``budget`` triangles. A label
    so small that the step its budget needs samples none of it keeps the coarsest surface that
    exists, over budget."""
    step = max(1, math.ceil(math.sqrt(_triangle_estimate(binary) / budget)))
    coarsest = None
    while (found := _marching_cubes(binary, step)) is not None:
        if len(found[1]) <= budget:
            return found
        coarsest, step = found, step + 1
    if coarsest is not None:
        return coarsest
    # Step 1 samples every voxel, so a finer step always finds the label.
    return next(found for finer in range(step - 1, 0, -1) if (found := _marching_cubes(binary, finer)))


def _triangle_estimate(binary: np.ndarray) -> float:
    """Triangles marching cubes gives at step 1: proportional to the exposed voxel faces.
    Guessing the step from it saves running a large label at full resolution first."""
    padded = np.pad(binary, 1)
    faces = sum(np.count_nonzero(np.diff(padded, axis=axis)) for axis in range(3))
    return TRIANGLES_PER_FACE * faces


def _marching_cubes(binary: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Marching cubes on ``binary`` (None when no sample at ``step`` falls inside it), padded
    with background: one voxel before, and after enough that the last sample of every axis falls
    on padding (marching cubes drops a partial last step, which would leave the surface open
    where the label meets the end of its box)."""
    after = [1 + (-(size + 1)) % step for size in binary.shape]
    padded = np.pad(binary, [(1, extra) for extra in after]).astype(np.float32)
    try:
        vertices, faces, _, _ = marching_cubes(padded, level=0.5, step_size=step)
    except RuntimeError:  # "No surface found": every sample at this step is background
        return None
    return vertices - 1.0, faces


def _mesh(vertices: np.ndarray, faces: np.ndarray, name: str, colour: str) -> go.Mesh3d:
    x, y, z = vertices.T
    i, j, k = faces.T
    return go.Mesh3d(
        x=x,
        y=y,
        z=z,
        i=i,
        j=j,
        k=k,
        name=name,
        color=colour,
        showlegend=True,
        flatshading=False,
        lighting=LIGHTING,
        lightposition=LIGHT_POSITION,
        hovertemplate=f"{name}<extra></extra>",
    )


def _empty_figure(unit: str) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(
        scene={
            "aspectmode": "data",  # millimetres are equal along every axis, whatever the voxel size
            "xaxis_title": f"R ({unit})",
            "yaxis_title": f"A ({unit})",
            "zaxis_title": f"S ({unit})",
        },
        legend={"itemsizing": "constant"},
        margin={"l": 0, "r": 0, "t": 30, "b": 0},
    )
    return figure


def _note(text: str, unit: str) -> go.Figure:
    figure = _empty_figure(unit)
    figure.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
    return figure
