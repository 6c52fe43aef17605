"""A full disk while a run saves its checkpoint or its best model, or while ``segment predict``
writes a mask or a probability map: one sentence, the file there before intact, nothing partial
left. The "disk" is filled with a file-size limit on the command alone (``ulimit -f``): a write
past it fails with EFBIG, "File too large", as one on a full disk fails with ENOSPC."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import nibabel as nib
import pytest
import SimpleITK as sitk
import torch
from conftest import (
    HIPPOCAMPUS,
    ROOT,
    one_sentence_error,
    segment_command,
    set_args,
    tiny_hippocampus_overrides,
)
from conftest import run_segment as segment

from segment.training.checkpoint import CHECKPOINT_FILE, load_checkpoint

CONFIG = str(ROOT / "configs" / "hippocampus_3d.yaml")
# Wider than the tiny set-up, so that what training writes dwarfs the MLflow database, which a
# limit must spare (the store writes under it too): weights of about 3 MB, a checkpoint of about
# 9 MB, a database of about 1 MB.
WIDE = "model.base_channels=24"
ROOM_FOR_THE_WEIGHTS_ONLY = 6_000_000
NO_ROOM_FOR_THE_WEIGHTS = 2_000_000
# A predicted mask takes about 13 KB and a probability map about 360 KB.
NO_ROOM_FOR_A_MASK = 2_000
ROOM_FOR_THE_MASK_ONLY = 64_000


def run_with_file_limit(limit: int, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``segment ARGS`` in a process that can write no file past ``limit`` bytes. SIGXFSZ,
    which would kill it at the first such write, is ignored: the write fails instead."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        segment_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=limit_file_size,
    )


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, hidden ones too, by its path in it: its SHA-256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hippocampus_root) -> Path:
    """A folder holding a real one-epoch training of the wide set-up: ``mlflow.db`` and ``runs``."""
    folder = tmp_path_factory.mktemp("trained")
    result = segment(
        "train", "--config", CONFIG, "--output-dir", "runs", "--quiet",
        *set_args([*tiny_hippocampus_overrides(epochs=1), WIDE]), cwd=folder, env=store_env(folder, hippocampus_root),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def store_env(folder: Path, hippocampus_root: Path) -> dict:
    return os.environ | {
        "SEGMENT_DATA_ROOT": str(hippocampus_root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }


@pytest.fixture
def copied_run(trained, tmp_path, hippocampus_root) -> tuple[Path, Path, dict]:
    """A copy of the trained run and its store for one test: (folder, run folder, environment)."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    (run_dir,) = (tmp_path / "runs").iterdir()
    return tmp_path, run_dir, store_env(tmp_path, hippocampus_root)


def resume(run_dir: Path, epochs: int) -> list[str]:
    return ["train", "--resume", run_dir.name, "--output-dir", "runs", "--quiet", "--set", f"trainer.max_epochs={epochs}"]


@pytest.mark.slow
def test_a_full_disk_while_the_checkpoint_is_saved_stops_the_run_and_keeps_the_previous_one(copied_run):
    folder, run_dir, env = copied_run
    checkpoint = digests(run_dir)[CHECKPOINT_FILE]

    result = run_with_file_limit(ROOM_FOR_THE_WEIGHTS_ONLY, *resume(run_dir, 2), cwd=folder, env=env)
    assert result.returncode == 2
    assert one_sentence_error(result) == (
        f"Error: Out of disk space: could not write the checkpoint of epoch 2 to runs/{run_dir.name}/{CHECKPOINT_FILE} "
        "(File too large); training stopped with the best model and the checkpoint of epoch 1 intact: free "
        f"some space, then continue with: segment train --resume {run_dir.name} --output-dir runs."
    )
    after = digests(run_dir)
    assert after[CHECKPOINT_FILE] == checkpoint
    assert load_checkpoint(run_dir)["state"].epochs_done == 1
    assert [name for name in after if Path(name).name.startswith(".")] == [], "a temporary file was left"

    # With room again, the command the sentence gives carries on from the checkpoint kept.
    resumed = segment(*resume(run_dir, 2), cwd=folder, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(run_dir)["state"].epochs_done == 2


@pytest.mark.slow
@pytest.mark.faults
def test_a_full_disk_while_the_best_model_is_saved_keeps_the_previous_best_model(copied_run):
    folder, run_dir, env = copied_run
    # As if no epoch had been validated yet, so that epoch 2 improves, whatever its score.
    path = run_dir / CHECKPOINT_FILE
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state"]["best_mean_dice"] = -1.0
    torch.save(checkpoint, path)
    before = digests(run_dir)

    result = run_with_file_limit(NO_ROOM_FOR_THE_WEIGHTS, *resume(run_dir, 2), cwd=folder, env=env)
    assert result.returncode == 2
    assert one_sentence_error(result) == (
        f"Error: Out of disk space: could not write the best model of epoch 2 to runs/{run_dir.name}/best (File too "
        "large); training stopped with the best model and the checkpoint of epoch 1 intact: free some space, "
        f"then continue with: segment train --resume {run_dir.name} --output-dir runs."
    )
    # The best model and the checkpoint byte for byte, and no other file beside them.
    assert digests(run_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("limit", "mask_name", "refused"),
    [
        (NO_ROOM_FOR_A_MASK, "mask.nii.gz", "mask.nii.gz"),
        # SimpleITK writes NRRD and MetaImage, and reports a full disk only as a failed stream.
        (NO_ROOM_FOR_A_MASK, "mask.nrrd", "mask.nrrd"),
        (ROOM_FOR_THE_MASK_ONLY, "mask.nii.gz", "probabilities.nii.gz"),
    ],
)
def test_a_full_disk_while_a_prediction_is_written_keeps_the_previous_file(
    trained, tmp_path, hippocampus_root, limit, mask_name, refused
):
    (run_dir,) = (trained / "runs").iterdir()
    task = hippocampus_root / HIPPOCAMPUS
    scan = task / "imagesTr" / "hippocampus_001.nii.gz"
    # What an earlier prediction left there: real label files, to be kept byte for byte.
    out = tmp_path / "out"
    out.mkdir()
    mask, probabilities = out / mask_name, out / "probabilities.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(task / "labelsTr" / "hippocampus_001.nii.gz")), str(mask), True)
    shutil.copyfile(scan, probabilities)
    before = digests(out)

    result = run_with_file_limit(
        limit, "predict", "--model", str(run_dir / "best"), "--input", str(scan), "--output", str(mask),
        "--probabilities", str(probabilities), cwd=tmp_path, env=dict(os.environ),
    )
    assert result.returncode == 2
    assert one_sentence_error(result) == (
        f"Error: Out of disk space: could not write {out / refused} (File too large); the previous file is intact."
    )
    after = digests(out)
    assert after[refused] == before[refused]
    assert [name for name in after if name.startswith(".")] == [], "a temporary file was left"
    if refused != mask.name:  # the mask came first, and was written whole
        assert nib.load(mask).shape == nib.load(scan).shape
