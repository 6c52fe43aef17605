"""Planning from a task's own data: the fingerprint (read once, cached, invalidated), the plan of
every Decathlon task from its stand-in (data_scripts/msd_fixtures.py: real dataset.json metadata,
synthetic volumes at the task's spacing), the plan of the real hippocampus task, and a short
training of every task's plan."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from conftest import load_script, store_client
from typer.testing import CliRunner

from segment import workflows
from segment.cli import app
from segment.config import load_config
from segment.planning import fingerprint as fingerprinting
from segment.planning.fingerprint import CaseFacts, ChannelStats, Fingerprint, FingerprintError, fingerprint
from segment.planning.plan import BUDGETS, MIN_COARSEST, plan_task

fixtures = load_script("msd_fixtures")
TASKS = list(fixtures.TASKS)
ANISOTROPIC = {"Task05_Prostate", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon"}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Every task's stand-in at an eighth of its size, fingerprints cached in the folder."""
    root = tmp_path_factory.mktemp("msd")
    for task in TASKS:
        fixtures.write_task(task, root, scale=0.125, cases=3)
    return root


def coarsest(shape, pooling) -> np.ndarray:
    shape = np.asarray(shape, float)
    for factors in pooling:
        shape = np.ceil(shape / np.asarray(factors))
    return shape


@pytest.mark.parametrize("task", TASKS)
def test_every_decathlon_task_is_planned_from_its_own_data(stand_ins, task):
    facts = fixtures.TASKS[task]
    planned = plan_task(fingerprint(stand_ins / task, progress=False), "cpu")
    config = planned.config
    assert config.data.task == task
    assert config.model.in_channels == len(facts.modalities), "one input per modality"
    assert config.model.out_channels == len(facts.labels)
    if facts.modalities == ("CT",):
        low, high, mean, std = config.data.ct_foreground
        assert config.data.modality == "ct" and low < mean < high and std > 0
    else:
        assert config.data.modality == "mri" and config.data.ct_foreground is None
    pooling = config.model.pool_factors
    if task in ANISOTROPIC:
        assert pooling[0] == (2, 2, 1), "the fine in-plane axes are pooled before the thick slices"
        thick = [case.spacing[2] for case in fingerprint(stand_ins / task, progress=False).cases]
        assert config.data.spacing[2] == pytest.approx(np.percentile(thick, 10)), "nnU-Net's thin-axis rule"
    else:
        assert pooling[0] == (2, 2, 2)
    size = config.data.patch_size or np.median(
        [case.shape for case in fingerprint(stand_ins / task, progress=False).cases], axis=0
    )
    assert (coarsest(size, pooling) >= MIN_COARSEST - 1).all() and config.model.levels <= BUDGETS["cpu"].max_levels
    assert config.data.flip_axes == (() if task == "Task02_Heart" else (0,)), "no mirroring of a left atrium"
    assert config.model.spatial_dims == 3


def test_a_plan_is_an_ordinary_commented_config(stand_ins, tmp_path):
    planned = plan_task(fingerprint(stand_ins / "Task05_Prostate", progress=False), "cpu")
    text = planned.to_yaml()
    assert text.startswith("# Planned by `segment plan` for cpu from the fingerprint of Task05_Prostate:")
    assert "  # one input per modality: T2, ADC\n  in_channels: 2\n" in text
    path = tmp_path / "prostate.yaml"
    path.write_text(text)
    assert load_config(path) == planned.config


def published(task: str) -> Fingerprint:
    """A fingerprint of ``task`` at its published median shape and spacing, without files."""
    facts = fixtures.TASKS[task]
    spacings = [
        facts.spacing,
        (*facts.spacing[:2], facts.spacing[2] * 0.8),
        (*facts.spacing[:2], facts.spacing[2] * 1.2),
    ]
    cases = [
        CaseFacts(f"c{i}", facts.shape, spacing, len(facts.modalities), {0: 1, 1: 1})
        for i, spacing in enumerate(spacings)
    ]
    stats = [ChannelStats(-100.0, 50.0, 200.0, 60.0, 40.0)] * len(facts.modalities)
    return Fingerprint(
        task, dict(enumerate(facts.modalities)), dict(enumerate(facts.labels)), "mm", cases, stats
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("task", TASKS)
def test_at_its_published_size_every_plan_fits_the_devices_budget(task, device):
    config = plan_task(published(task), device).config
    budget = BUDGETS[device]
    per_step = budget.voxels_3d if config.model.spatial_dims == 3 else budget.pixels_2d
    pooling = np.prod(np.array(config.model.pool_factors), axis=0)
    if config.data.patch_size is not None:
        patch = np.array(config.data.patch_size)
        assert np.prod(patch) * config.trainer.batch_size <= per_step
        assert (patch % pooling == 0).all(), "the patch pools evenly"
        assert config.trainer.roi_size == config.data.patch_size
        assert (coarsest(patch, config.model.pool_factors) >= MIN_COARSEST).all()
    else:
        assert task == "Task04_Hippocampus", "only the hippocampus crops train as whole volumes"


def test_the_real_hippocampus_task_plans_in_seconds_like_its_hand_written_config(
    hippocampus_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the shared data is read-only: cache here
    started = time.perf_counter()
    planned = workflows.plan(hippocampus_root / "Task04_Hippocampus", device="cpu", progress=False)
    seconds = time.perf_counter() - started
    print(f"planned Task04_Hippocampus (208 cases) in {seconds:.1f} s")
    config, hand = planned.config, load_config(fixtures_root() / "configs" / "hippocampus_3d_10min.yaml")
    assert config.data.spacing is None and config.data.patch_size is None, "1 mm crops, trained whole"
    assert config.data.flip_axes == hand.data.flip_axes == (0,)
    assert (config.model.spatial_dims, config.model.in_channels, config.model.out_channels) == (3, 1, 3)
    assert config.model.levels == hand.model.levels == 5
    assert config.model.pool_factors[-1] == (1, 2, 1), "the last level pools only the longest axis"
    assert list(tmp_path.rglob("*.json")), "cached in the user's cache, not beside the read-only data"


def fixtures_root():
    from conftest import ROOT

    return ROOT


def test_the_fingerprint_is_cached_and_computed_again_when_the_data_changes(tmp_path, monkeypatch):
    folder = fixtures.write_task("Task09_Spleen", tmp_path, scale=0.125, cases=3)
    first = fingerprint(folder, progress=False)
    assert (folder / fingerprinting.CACHE_NAME).is_file()

    def unread(*_):
        raise AssertionError("read a case although nothing changed")

    monkeypatch.setattr(fingerprinting, "_read_case", unread)
    assert fingerprint(folder, progress=False) == first
    monkeypatch.undo()
    label = folder / "labelsTr" / "spleen_001.nii"
    os.utime(label, ns=(time.time_ns(), time.time_ns() + 10**9))
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["1"] = "Spleen"
    (folder / "dataset.json").write_text(json.dumps(dataset))
    assert fingerprint(folder, progress=False).labels[1] == "Spleen"


def test_a_read_only_task_folder_is_cached_in_the_users_cache(tmp_path, monkeypatch):
    folder = fixtures.write_task("Task04_Hippocampus", tmp_path / "data", scale=0.25, cases=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder.chmod(0o555)
    try:
        fingerprint(folder, progress=False)
    finally:
        folder.chmod(0o755)
    assert not (folder / fingerprinting.CACHE_NAME).exists()
    assert len(list((tmp_path / "cache" / "segment" / "fingerprints").iterdir())) == 1


def test_unusable_task_folders_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(FingerprintError, match=r"holds no dataset.json; give an MSD-layout task folder\.$"):
        fingerprint(tmp_path, progress=False)
    folder = fixtures.write_task("Task02_Heart", tmp_path, scale=0.125, cases=2)
    (folder / "labelsTr" / "heart_001.nii").unlink()
    with pytest.raises(FingerprintError, match=r"lists ./imagesTr/heart_001.nii but .* does not exist\.$"):
        fingerprint(folder, progress=False)
    result = CliRunner().invoke(app, ["plan", "Task77_Nowhere", "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "Task77_Nowhere was not found" in result.output


def test_segment_plan_prints_or_writes_the_config(stand_ins, tmp_path):
    runner = CliRunner()
    printed = runner.invoke(
        app, ["plan", "Task05_Prostate", "--data-root", str(stand_ins), "--device", "cpu", "--quiet"]
    )
    assert printed.exit_code == 0, printed.output
    assert "  in_channels: 2" in printed.output
    output = tmp_path / "prostate.yaml"
    written = runner.invoke(
        app, ["plan", str(stand_ins / "Task05_Prostate"), "-o", str(output), "--device", "cuda", "--quiet"]
    )
    assert written.exit_code == 0 and written.output.strip() == f"Wrote {output}."
    assert load_config(output).model.base_channels == BUDGETS["cuda"].base_channels_3d


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_every_tasks_plan_trains_a_short_epoch(stand_ins, tmp_path, task):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--task",
            task,
            "--data-root",
            str(stand_ins),
            "--tracking-uri",
            uri,
            "--output-dir",
            str(tmp_path / "runs"),
            "--quiet",
            "--device",
            "cpu",
            "--set",
            "trainer.max_epochs=1",
            "trainer.val_every=1",
            "trainer.batch_size=1",
        ],
    )
    assert result.exit_code == 0, result.output
    [run] = store_client(uri).search_runs(store_client(uri).search_experiments()[0].experiment_id)
    assert run.data.params["data.task"] == task
    assert 0.0 <= run.data.metrics["best_val_mean_dice"] <= 1.0
