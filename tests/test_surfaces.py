"""The 3D view of a mask: one closed surface per label of the real hippocampus_001 labels, in
the scan's RAS millimetres, enclosing the label's volume, within a triangle budget."""

from __future__ import annotations

import itertools

import numpy as np
import plotly.graph_objects as go
import pytest
from segment.app.surfaces import EMPTY_NOTE, SLICE_NOTE, label_surfaces

from segment import plots
from segment.io import LPS_TO_RAS, Scan, read_scan

NAMES = {1: "Anterior", 2: "Posterior"}


@pytest.fixture(scope="module")
def label(hippocampus_root) -> Scan:
    return read_scan(hippocampus_root / "Task04_Hippocampus" / "labelsTr" / "hippocampus_001.nii.gz")


def meshes(figure: go.Figure) -> dict[str, go.Mesh3d]:
    assert all(isinstance(trace, go.Mesh3d) for trace in figure.data)
    return {trace.name: trace for trace in figure.data}


def vertices(mesh: go.Mesh3d) -> np.ndarray:
    return np.column_stack([mesh.x, mesh.y, mesh.z])


def enclosed_volume(mesh: go.Mesh3d) -> float:
    """Divergence theorem: the sum of the signed tetrahedra from the origin to each triangle."""
    points = vertices(mesh)
    a, b, c = (points[np.asarray(index)] for index in (mesh.i, mesh.j, mesh.k))
    return abs(float(np.einsum("ij,ij->", a, np.cross(b, c)))) / 6.0


def notes(figure: go.Figure) -> list[str]:
    return [annotation.text for annotation in figure.layout.annotations]


def test_one_named_coloured_mesh_per_label_with_ras_axes(label):
    figure = label_surfaces(label.array, label.affine, NAMES)
    found = meshes(figure)
    assert list(found) == ["Anterior", "Posterior"]
    assert [mesh.color for mesh in found.values()] == [plots.label_colour(1), plots.label_colour(2)]
    assert all(mesh.showlegend for mesh in found.values())
    scene = figure.layout.scene
    assert scene.aspectmode == "data"
    assert [scene.xaxis.title.text, scene.yaxis.title.text, scene.zaxis.title.text] == [
        "R (mm)",
        "A (mm)",
        "S (mm)",
    ]
    assert not notes(figure)


def test_vertices_lie_inside_the_scans_ras_bounding_box(label):
    # The grid's outer faces are half a voxel beyond the first and last voxel centres.
    corners = np.array(list(itertools.product(*[(-0.5, size - 0.5) for size in label.array.shape])))
    ras = corners @ label.affine[:3, :3].T + label.affine[:3, 3]
    for mesh in meshes(label_surfaces(label.array, label.affine, NAMES)).values():
        points = vertices(mesh)
        assert (points >= ras.min(axis=0) - 1e-6).all() and (points <= ras.max(axis=0) + 1e-6).all()


def test_the_anterior_surface_encloses_the_labels_volume(label):
    anterior = meshes(label_surfaces(label.array, label.affine, NAMES))["Anterior"]
    voxels = np.count_nonzero(label.array == 1) * abs(np.linalg.det(label.affine[:3, :3]))
    assert enclosed_volume(anterior) == pytest.approx(voxels, rel=0.05)


def test_anisotropic_voxels_scale_the_volume(label):
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    plain = meshes(label_surfaces(label.array, label.affine, NAMES))["Anterior"]
    stretched = meshes(label_surfaces(label.array, affine, NAMES))["Anterior"]
    assert enclosed_volume(stretched) == pytest.approx(3.0 * enclosed_volume(plain), rel=1e-6)


def test_an_lps_affine_mirrors_the_vertices_through_right_and_anterior(label):
    ras = meshes(label_surfaces(label.array, label.affine, NAMES))
    lps = meshes(label_surfaces(label.array, LPS_TO_RAS @ label.affine, NAMES))
    for name in NAMES.values():
        np.testing.assert_allclose(vertices(lps[name]), vertices(ras[name]) * [-1.0, -1.0, 1.0], atol=1e-9)


def test_a_small_triangle_budget_is_honoured_by_coarser_surfaces(label):
    full = meshes(label_surfaces(label.array, label.affine, NAMES))
    light = meshes(label_surfaces(label.array, label.affine, NAMES, max_triangles=1000))
    assert sum(len(mesh.i) for mesh in full.values()) > 1000
    assert sum(len(mesh.i) for mesh in light.values()) <= 1000
    assert all(len(mesh.i) > 0 for mesh in light.values())


def test_a_label_at_the_edge_of_the_volume_gives_a_closed_surface_at_every_step():
    mask = np.ones((20, 21, 22), dtype=np.uint8)  # the label fills the volume, touching every face
    for budget in (1_000_000, 1500, 300):
        (mesh,) = label_surfaces(mask, np.eye(4), {1: "box"}, max_triangles=budget).data
        assert len(mesh.i) <= budget
        triangles = np.column_stack([mesh.i, mesh.j, mesh.k])
        edges = np.sort(
            np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1
        )
        _, uses = np.unique(edges, axis=0, return_counts=True)
        assert (uses == 2).all(), f"open surface at a budget of {budget}"


def test_visible_hides_a_label_and_colours_replace_the_defaults(label):
    figure = label_surfaces(label.array, label.affine, NAMES, colours={2: "#123456"}, visible=[2])
    assert [(mesh.name, mesh.color) for mesh in figure.data] == [("Posterior", "#123456")]


def test_an_empty_mask_or_all_labels_hidden_gives_one_note(label):
    empty = label_surfaces(np.zeros((4, 5, 6)), np.eye(4), NAMES)
    hidden = label_surfaces(label.array, label.affine, NAMES, visible=[])
    for figure in (empty, hidden):
        assert not figure.data and notes(figure) == [EMPTY_NOTE]
    assert EMPTY_NOTE == "No labelled voxels to show."


def test_a_single_slice_gives_a_note_not_a_surface(label):
    figure = label_surfaces(label.array[:, :, 17:18], label.affine, NAMES)
    assert not figure.data and notes(figure) == [SLICE_NOTE]


def test_unknown_labels_get_a_name_and_the_unit_is_shown():
    mask = np.zeros((6, 6, 6), dtype=np.int16)
    mask[2:4, 2:4, 2:4] = 7
    figure = label_surfaces(mask, np.eye(4), NAMES, unit="µm")
    assert [mesh.name for mesh in figure.data] == ["label 7"]
    assert figure.layout.scene.xaxis.title.text == "R (µm)"
