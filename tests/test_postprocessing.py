"""Post-processing a predicted mask: each label's largest component, a minimum object size in
the scan's units; in `segment predict`, and in `segment evaluate` beside the raw masks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from segment.cli import app
from segment.engine.postprocessing import PostProcessing, postprocess
from segment.errors import InputError

MODEL = "hippocampus_3d"


def two_blobs() -> np.ndarray:
    """Label 1: a 27-voxel cube and, apart, a 3-voxel bar; label 2: two voxels touching only at a corner."""
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[1:4, 1:4, 1:4] = 1
    labels[8, 8, 7:10] = 1
    labels[6, 1, 1] = 2
    labels[7, 2, 2] = 2
    return labels


def test_keep_largest_keeps_one_component_per_label_counting_corners_as_connected():
    labels = two_blobs()
    kept = postprocess(labels, 1.0, PostProcessing(keep_largest=True))
    assert (kept == 1).sum() == 27 and kept[8, 8, 8] == 0
    assert (kept == 2).sum() == 2  # the corner-touching pair is one component


def test_min_size_is_a_volume_in_the_scans_units():
    labels = two_blobs()
    # 2 mm voxels are 8 mm³: the 3-voxel bar is 24 mm³, the corner pair 16 mm³.
    removed = postprocess(labels, 8.0, PostProcessing(min_size=25.0))
    assert (removed == 1).sum() == 27 and (removed == 2).sum() == 0
    kept = postprocess(labels, 8.0, PostProcessing(min_size=16.0))
    assert np.array_equal(kept, labels)


def test_the_variants_an_evaluation_compares():
    both = PostProcessing(keep_largest=True, min_size=5.0)
    assert [v.describe() for v in both.variants()] == ["keep largest", "min size 5 mm³", "keep largest, min size 5 mm³"]
    assert PostProcessing(keep_largest=True).variants() == [PostProcessing(keep_largest=True)]
    with pytest.raises(InputError, match="positive volume"):
        PostProcessing(min_size=0)


def test_predict_keeps_the_largest_component_of_each_label_of_a_real_scan(tmp_path, hippocampus_root):
    scan = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    runner = CliRunner()
    raw = runner.invoke(app, ["predict", "--model", MODEL, "-i", str(scan), "-o", str(tmp_path / "raw.nii.gz")])
    cleaned = runner.invoke(
        app, ["predict", "--model", MODEL, "-i", str(scan), "-o", str(tmp_path / "clean.nii.gz"), "--keep-largest"]
    )
    assert raw.exit_code == 0 and cleaned.exit_code == 0, cleaned.output
    raw_mask = np.asarray(nib.load(tmp_path / "raw.nii.gz").dataobj)
    clean_mask = np.asarray(nib.load(tmp_path / "clean.nii.gz").dataobj)
    structure = ndimage.generate_binary_structure(3, 3)
    for value in (1, 2):
        assert ndimage.label(clean_mask == value, structure)[1] == 1
        # Only whole components go: every voxel kept was predicted with the same label.
        assert np.all(raw_mask[clean_mask == value] == value)


def test_evaluate_scores_each_step_beside_the_raw_masks(tmp_path, hippocampus_root):
    task = hippocampus_root / "Task04_Hippocampus"
    report_path = tmp_path / "report.json"
    command = ["evaluate", "--model", MODEL, "--data", str(task), "--max-cases", "3"]
    result = CliRunner().invoke(app, [*command, "--keep-largest", "--min-size", "20", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    rows = report["postprocessing"]
    assert [row["steps"] for row in rows] == ["none", "keep largest", "min size 20 mm³", "keep largest, min size 20 mm³"]
    assert rows[0]["mean_dice"] == pytest.approx(report["mean_dice"])
    assert all(0 < row["mean_dice"] <= 1 for row in rows)
    assert "post-processing keep largest: mean Dice" in result.output


def test_a_min_size_that_is_not_positive_is_refused_in_one_sentence(tmp_path: Path):
    result = CliRunner().invoke(
        app, ["predict", "--model", MODEL, "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--min-size", "-3"]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: --min-size -3.0: give a positive volume")
