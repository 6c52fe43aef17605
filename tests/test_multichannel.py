"""Multi-modal scans end to end: 4D NIfTI images whose 4th dimension holds the model's input
channels (the Decathlon's brain tumour and prostate layout), read, normalised per channel,
trained on, predicted, evaluated; the CT foreground normalisation; and the two-channel
hippocampus task built from real scans."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, in_test_folder, load_script, tiny_hippocampus_overrides
from monai import transforms as T
from segment.app.page_state import channel_choices
from segment.app.rendering import DisplayVolume, channel_windows
from segment.app.uploads import read_upload
from typer.testing import CliRunner

from segment.cli import app
from segment.config import load_config
from segment.data.transforms import IMAGE, LABEL, Above, ct_floor, orient_and_normalise, scan_as_tensor
from segment.engine.preparation import prepare
from segment.io import ScanError, read_scan, write_mask

two_channel = load_script("two_channel_hippocampus")
CONFIG = ROOT / "configs" / "hippocampus_3d.yaml"
TASK = "Task91_HippocampusTwoChannel"
CASE = "hippocampus_001"
MODEL_NAME = "hippocampus_two_channel"
CHANNEL_NAMES = ("MRI", "MRI gradient magnitude")


def real_case(root: Path) -> Path:
    return root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz"


def stacked(path: Path, target: Path, channels: int) -> Path:
    """The real scan at ``path`` repeated (and scaled) into ``channels`` channels at ``target``."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    nib.save(
        nib.Nifti1Image(np.stack([data * (c + 1) for c in range(channels)], axis=-1), image.affine), target
    )
    return target


def one_sentence(message: str) -> str:
    assert "\n" not in message and message.endswith("."), message
    return message


# --- reading ------------------------------------------------------------------------------------


def test_a_4d_scan_with_the_models_channel_count_reads_as_channels_on_the_scans_grid(
    tmp_path, hippocampus_root
):
    source = read_scan(real_case(hippocampus_root))
    scan = read_scan(stacked(real_case(hippocampus_root), tmp_path / "scan.nii.gz", 3), channels=3)
    assert scan.channels == 3 and source.channels == 1
    assert scan.array.shape == (*source.shape, 3) and scan.shape == source.shape == source.array.shape
    np.testing.assert_array_equal(scan.array[..., 0], source.array)
    np.testing.assert_array_equal(scan.array[..., 2], 3 * source.array)
    np.testing.assert_allclose(scan.affine, source.affine)
    tensor = scan_as_tensor(scan)
    assert tuple(tensor.shape) == (3, *source.shape)
    np.testing.assert_array_equal(np.asarray(tensor[1]), scan.array[..., 1])


@pytest.mark.parametrize(
    ("channels_in_file", "read_with", "expected"),
    [
        (3, 2, "has 4 dimensions (35, 51, 35, 3): 3 channels (its 4th dimension), but the model reads 2"),
        (2, 1, "has 4 dimensions (35, 51, 35, 2): 2 channels (its 4th dimension), but the model reads 1"),
        (1, 2, "has 1 channel (it is 3D, without a 4th dimension) but the model reads 2"),
    ],
)
def test_a_wrong_channel_count_is_refused_in_one_sentence_naming_both_counts(
    tmp_path, hippocampus_root, channels_in_file, read_with, expected
):
    path = real_case(hippocampus_root)
    if channels_in_file > 1:
        path = stacked(path, tmp_path / "scan.nii.gz", channels_in_file)
    with pytest.raises(ScanError) as refused:
        read_scan(path, channels=read_with)
    message = one_sentence(str(refused.value))
    assert message.startswith(path.name) and expected in message
    assert message.endswith("give a scan with one channel per model input.")


def test_nan_voxels_are_repaired_per_channel_and_a_channel_without_data_is_refused(tmp_path):
    data = np.stack(
        [np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.full((4, 4, 4), 100.0, np.float32)], -1
    )
    data[0, 0, 0, :] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    scan = read_scan(tmp_path / "nan.nii.gz", channels=2)
    assert scan.array[0, 0, 0, 0] == 1.0 and scan.array[0, 0, 0, 1] == 100.0  # each channel's own lowest
    assert scan.warnings == ["nan.nii.gz: 2 NaN or infinite voxels were set to the lowest finite intensity."]
    data[..., 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(ScanError, match="holds no finite intensities"):
        read_scan(tmp_path / "empty.nii.gz", channels=2)


def test_a_mask_of_a_multichannel_scan_is_3d_with_the_scans_affine(tmp_path, hippocampus_root):
    scan = read_scan(stacked(real_case(hippocampus_root), tmp_path / "scan.nii.gz", 2), channels=2)
    write_mask(np.ones(scan.shape, np.uint8), scan, tmp_path / "mask.nii.gz", {0: "background", 1: "one"})
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == scan.shape
    np.testing.assert_allclose(mask.affine, scan.affine)


# --- normalisation ------------------------------------------------------------------------------


def test_per_channel_z_score_equals_todays_single_channel_result(tmp_path, hippocampus_root):
    one = load_config(CONFIG)
    two = load_config(CONFIG, ["model.in_channels=2"])
    scan = read_scan(real_case(hippocampus_root))
    single = prepare(scan, one).volume
    # Before channel_wise: the same two transforms over the whole tensor.
    low, high = one.data.clip_percentiles
    before = T.Compose([T.ClipIntensityPercentiles(lower=low, upper=high), T.NormalizeIntensity()])(
        scan_as_tensor(scan)
    )
    np.testing.assert_allclose(single[0].numpy(), np.asarray(before), rtol=1e-6, atol=1e-6)
    both = prepare(read_scan(stacked(real_case(hippocampus_root), tmp_path / "s.nii.gz", 2), 2), two).volume
    assert both.shape[1] == 2
    np.testing.assert_allclose(both[:, :1].numpy(), single.numpy(), rtol=1e-6, atol=1e-6)
    # Channel 1 is channel 0 doubled: a per-channel z-score makes them equal.
    np.testing.assert_allclose(both[:, 1].numpy(), both[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_a_scan_read_for_another_model_is_refused_by_prepare_in_one_sentence(hippocampus_root):
    with pytest.raises(ScanError) as refused:
        prepare(read_scan(real_case(hippocampus_root)), load_config(CONFIG, ["model.in_channels=2"]))
    assert "has 1 channel but hippocampus_3d reads 2" in one_sentence(str(refused.value))


def ct_volume() -> np.ndarray:
    """Air (-1000 HU) around a block of tissue from -60 to 400 HU, some below the mean."""
    volume = np.full((20, 20, 20), -1000.0, np.float32)
    volume[5:15, 6:12, 4:16] = np.linspace(-60.0, 400.0, 10 * 6 * 12).reshape(10, 6, 12)
    return volume


def normalised_ct(overrides: list[str]) -> tuple[np.ndarray, float]:
    config = load_config(CONFIG, ["data.modality=ct", *overrides])
    data = {IMAGE: torch.from_numpy(ct_volume()[None]), LABEL: torch.zeros(1, 20, 20, 20)}
    data = {
        key: T.EnsureChannelFirst(channel_dim=0)(value, meta_dict={"affine": np.eye(4)})
        for key, value in data.items()
    }
    out = T.Compose(orient_and_normalise(config, (IMAGE, LABEL)))(data)
    return np.asarray(out[IMAGE][0]), ct_floor(config.data)


def test_ct_foreground_clips_and_z_scores_and_the_air_is_still_cropped():
    low, high, mean, std = -50.0, 300.0, 80.0, 60.0
    image, floor = normalised_ct([f"data.ct_foreground=[{low},{high},{mean},{std}]"])
    expected = (np.clip(ct_volume(), low, high) - mean) / std
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)
    assert floor == pytest.approx((low - mean) / std) and floor < 0
    assert (image[5:15, 6:12, 4:16] < 0).any(), "tissue below the mean is negative too"
    box = T.CropForeground(select_fn=Above(floor), allow_smaller=True).compute_bounding_box(image[None])
    assert [list(corner) for corner in box] == [[5, 6, 4], [15, 12, 16]], "the block, without the air"


def test_without_ct_foreground_the_fixed_window_scales_to_0_1_as_before():
    image, floor = normalised_ct([])
    low, high = -175.0, 250.0
    np.testing.assert_allclose(image, np.clip((ct_volume() - low) / (high - low), 0, 1), atol=1e-6)
    assert floor == 0.0


def test_ct_foreground_must_be_an_ordered_range_with_a_positive_std():
    with pytest.raises(Exception, match="ct_foreground must be"):
        load_config(CONFIG, ["data.modality=ct", "data.ct_foreground=[300,-50,80,60]"])


# --- the viewer's side, without Streamlit -------------------------------------------------------


def test_channel_choices_come_from_the_config_else_are_numbered():
    named = load_config(CONFIG, ["model.in_channels=2", f"data.channel_names=[{','.join(CHANNEL_NAMES)}]"])
    assert channel_choices(named) == list(CHANNEL_NAMES)
    assert channel_choices(load_config(CONFIG, ["model.in_channels=3"])) == [
        "channel 1",
        "channel 2",
        "channel 3",
    ]
    assert channel_choices(load_config(CONFIG)) == ["channel 1"]


def test_an_upload_is_read_with_the_models_channels_and_each_channel_has_its_window(
    tmp_path, hippocampus_root
):
    data = stacked(real_case(hippocampus_root), tmp_path / "scan.nii.gz", 2).read_bytes()
    upload = read_upload("My two.nii.gz", data, "scan", channels=2)
    assert upload.scan.channels == 2
    windows = channel_windows(upload.scan.array)
    assert windows[1] == pytest.approx((2 * windows[0][0], 2 * windows[0][1]))
    display = DisplayVolume.from_array(upload.scan.array, upload.scan.affine)
    assert display.shape == display.channel(1).shape == display.channel(1).data.shape
    with pytest.raises(ScanError) as refused:
        read_upload("My two.nii.gz", data, "scan")
    assert str(refused.value).startswith("My two.nii.gz has 4 dimensions")


# --- the two-channel task, a model trained on it, predict and evaluate ----------------------------


def test_the_task_script_writes_4d_images_of_real_scans_and_copies_the_labels(tmp_path, hippocampus_root):
    source = hippocampus_root / "Task04_Hippocampus"
    task = two_channel.build(source, tmp_path / TASK, cases=2)
    dataset = json.loads((task / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "MRI", "1": "MRI gradient magnitude"}
    assert dataset["numTraining"] == 2 and dataset["tensorImageSize"] == "4D"
    assert dataset["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    entry = dataset["training"][0]
    image, original = nib.load(task / entry["image"]), nib.load(source / entry["image"])
    assert image.shape == (*original.shape, 2)
    np.testing.assert_allclose(image.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[..., 0], np.asarray(original.dataobj, np.float32))
    assert (task / entry["label"]).read_bytes() == (source / entry["label"]).read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == [TASK], "no staging folder left"
    with pytest.raises(two_channel.ConversionError, match="already exists; pass --overwrite"):
        two_channel.build(source, task, cases=2)


def two_channel_overrides(epochs: int = 1) -> list[str]:
    return [
        *tiny_hippocampus_overrides(epochs=epochs),
        f"name={MODEL_NAME}",
        f"data.task={TASK}",
        "model.in_channels=2",
        f"data.channel_names=[{','.join(CHANNEL_NAMES)}]",
    ]


def train_two_channel(folder: Path, hippocampus_root: Path, epochs: int = 1):
    """The two-channel task of 8 real cases in ``folder`` and a tiny model trained on it, its
    runs in ``folder/mlflow.db``: (the task folder, the training result)."""
    from segment.training.run import train

    task = two_channel.build(hippocampus_root / "Task04_Hippocampus", folder / TASK, cases=8)
    config = load_config(CONFIG, two_channel_overrides(epochs))
    return task, train(config, **in_test_folder(folder, folder))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hippocampus_root):
    return train_two_channel(tmp_path_factory.mktemp("two_channel"), hippocampus_root)


@pytest.mark.slow
def test_a_two_channel_model_trains_predicts_3d_masks_and_refuses_a_3d_scan(trained, tmp_path, monkeypatch):
    task, result = trained
    model = str(result.model_dir)
    assert set(result.best_dice) == {"Anterior", "Posterior"}
    scan = task / "imagesTr" / f"{CASE}.nii.gz"
    monkeypatch.chdir(tmp_path)
    written = CliRunner().invoke(
        app, ["predict", "--model", model, "--input", str(scan), "--output", "mask.nii.gz"]
    )
    assert written.exit_code == 0, written.output
    mask, image = nib.load(tmp_path / "mask.nii.gz"), nib.load(scan)
    assert mask.shape == image.shape[:3] and len(image.shape) == 4
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}

    single = task.parent / "single.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., 0], image.affine), single)
    (tmp_path / "refused").mkdir()
    refused = CliRunner().invoke(
        app, ["predict", "--model", model, "--input", str(single), "--output", "refused/mask.nii.gz"]
    )
    assert refused.exit_code == 2
    [line] = [line for line in refused.stderr.splitlines() if line.strip()]
    assert "single.nii.gz has 1 channel (it is 3D, without a 4th dimension) but the model reads 2" in line
    assert not any((tmp_path / "refused").iterdir()), "no mask, sidecar or temporary file"


@pytest.mark.slow
def test_evaluate_scores_the_two_channel_task_and_refuses_single_channel_cases(
    trained, tmp_path, monkeypatch, hippocampus_root
):
    task, result = trained
    monkeypatch.chdir(tmp_path)
    scored = CliRunner().invoke(
        app, ["evaluate", "--model", str(result.model_dir), "--data", str(task), "--json", "report.json"]
    )
    assert scored.exit_code == 0, scored.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cases"] == 8 and set(report["dice"]) == {"Anterior", "Posterior"}
    assert 0.0 <= report["mean_dice"] <= 1.0
    # The single-channel task: its scans are unusable for this model, as an unreadable one is.
    refused = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(result.model_dir), "--data", str(hippocampus_root / "Task04_Hippocampus"),
         "--max-cases", "2", "--json", "refused.json"],
    )  # fmt: skip
    assert refused.exit_code == 2
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("Error: ")]
    assert "has 1 channel (it is 3D, without a 4th dimension) but the model reads 2" in line
    assert not (tmp_path / "refused.json").exists()
