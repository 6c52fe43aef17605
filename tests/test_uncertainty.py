"""Probability and uncertainty maps from `segment predict`: real scans in, NIfTI maps out
on the scan's voxels; Monte Carlo over skip settings for a skip-dropout model, the members'
disagreement for an ensemble."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segment import workflows
from segment.cli import app
from segment.engine.device import make_runtime
from segment.engine.preparation import prepare
from segment.engine.uncertainty import estimate, skip_samples
from segment.io import read_scan
from segment.models import load_model, save_model
from segment.models.sources import resolve_model

MODEL = "hippocampus_3d"


@pytest.fixture(scope="module")
def scan_path(hippocampus_root):
    return hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One U-Net of the bundled ensemble, trained with skip dropout, as a model folder."""
    ensemble, config = load_model(resolve_model(MODEL))
    folder = tmp_path_factory.mktemp("single") / "member"
    save_model(ensemble.members[0], config, folder)
    return folder


def test_skip_settings_are_drawn_with_the_models_dropout_and_keep_switched_off_skips_off(single):
    network, _ = load_model(single)
    drawn = skip_samples(network, None, 400)
    kept = np.mean(drawn, axis=0)
    assert np.allclose(kept, 1 - np.array(network.config.skip_dropout_per_level), atol=0.05)
    assert all(mask[1] == 0 for mask in skip_samples(network, [1, 0, 1, 1], 50))
    assert skip_samples(network, None, 8) == skip_samples(network, None, 8)  # reproducible


def test_monte_carlo_over_skip_settings_gives_probabilities_entropy_and_disagreement(scan_path, single):
    network, config = load_model(single)
    prepared = prepare(read_scan(scan_path), config)
    found = estimate(network, prepared.volume, make_runtime("cpu"), config, samples=8)
    assert found.source == "8 skip settings drawn with the model's skip dropout"
    torch.testing.assert_close(found.probabilities.sum(dim=1), torch.ones_like(found.probabilities[:, 0]))
    assert float(found.entropy.min()) >= 0 and float(found.entropy.max()) <= 1
    assert found.disagreement is not None and float(found.disagreement.min()) >= 0
    assert float(found.disagreement.max()) > 0.01  # the skip settings do not all agree
    # Most uncertain at the boundary of the structure, not deep in the background.
    labels = found.probabilities.argmax(dim=1)
    background_far = found.entropy[0, 0][labels[0] == 0].median()
    assert float(found.entropy.max()) > 10 * float(background_far)


def test_predict_writes_both_maps_on_the_scans_voxels(tmp_path, scan_path, single):
    args = ["predict", "--model", str(single), "-i", str(scan_path), "-o", str(tmp_path / "mask.nii.gz")]
    maps = ["--probabilities", str(tmp_path / "p.nii.gz"), "--uncertainty", str(tmp_path / "u.nii.gz")]
    result = CliRunner().invoke(app, [*args, *maps])
    assert result.exit_code == 0, result.output
    assert "from 8 skip settings drawn with the model's skip dropout" in result.output
    scan = nib.load(scan_path)
    mask = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
    probabilities, uncertainty = nib.load(tmp_path / "p.nii.gz"), nib.load(tmp_path / "u.nii.gz")
    assert probabilities.shape == (*scan.shape, 3) and uncertainty.shape == (*scan.shape, 2)
    assert probabilities.get_data_dtype() == np.uint16  # scaled to [0, 1] by the header
    np.testing.assert_allclose(probabilities.affine, scan.affine, atol=1e-5)
    values = probabilities.get_fdata()
    np.testing.assert_allclose(values.sum(axis=-1), 1.0, atol=1e-3)
    # The mask is the model's own (all skips on); the mean over skip settings nearly always agrees.
    assert (values.argmax(axis=-1) == mask).mean() > 0.98
    assert b"entropy, disagreement" in uncertainty.header["descrip"].tobytes()


def test_the_bundled_ensemble_disagrees_but_one_model_twice_does_not(tmp_path, scan_path, single):
    network, config = load_model(resolve_model(MODEL))
    prepared = prepare(read_scan(scan_path), config)
    found = estimate(network, prepared.volume, make_runtime("cpu"), config)
    assert found.source == "the 3 members of the ensemble"
    assert float(found.disagreement.max()) > 0.01
    ensemble = workflows.ensemble([str(single), str(single)], tmp_path / "twice")
    network, config = load_model(ensemble)
    prepared = prepare(read_scan(scan_path), config)
    found = estimate(network, prepared.volume, make_runtime("cpu"), config)
    assert found.source == "the 2 members of the ensemble"
    assert float(found.disagreement.max()) < 1e-5


def test_maps_in_a_format_other_than_nifti_are_refused_in_one_sentence(tmp_path, scan_path):
    args = ["predict", "--model", MODEL, "-i", str(scan_path), "-o", str(tmp_path / "mask.nii.gz")]
    result = CliRunner().invoke(app, [*args, "--uncertainty", str(tmp_path / "u.nrrd")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: u.nrrd: uncertainty maps are written as NIfTI; give a .nii.gz or .nii file."
    )
    assert not (tmp_path / "mask.nii.gz").exists()
