"""The trainer's parts on their own: one step on a tensor batch, fp16 with a grad scaler on the
CPU, the moving average, the callbacks around the epochs, the random streams per rank and per
epoch, and, in two gloo processes, the shared clock and the download barrier."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import HIPPOCAMPUS, ROOT, free_port, tiny_hippocampus_overrides
from monai.data import DataLoader, Dataset
from monai.data.meta_obj import get_track_meta
from monai.transforms import RandFlipd

from segment.config import ExperimentConfig, load_config
from segment.data import msd
from segment.data.loaders import DeviceLoader, training_loader
from segment.data.tasks import split_task
from segment.engine.device import make_runtime
from segment.training.callbacks import BestModel, Callback, Checkpoint, EpochEnd, TimeBudget, Validation
from segment.training.checkpoint import TrainingState, load_checkpoint
from segment.training.distributed import Distributed, split_on_every_rank
from segment.training.loop import fit
from segment.training.schedule import TrainingClock
from segment.training.seeding import rank_seed, resolve_deterministic, seed_epoch
from segment.training.setup import build_setup
from segment.training.step import train_step
from segment.training.teaching import MovingAverage


def tiny_config(**trainer) -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny",
        model={"spatial_dims": 3, "levels": 3, "base_channels": 4, "out_channels": 3, "skip_dropout": 0.5},
        trainer={"max_epochs": 2, "warmup_epochs": 0, "batch_size": 2, **trainer},
    )


def tensor_batch(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    """A bright blob labelled 1 inside a box labelled 2, on noise: something a U-Net can learn."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, 16, 16, 16, generator=generator) * 0.1
    label = torch.zeros(batch, 1, 16, 16, 16, dtype=torch.uint8)
    label[:, :, 3:13, 3:13, 3:13] = 2
    label[:, :, 6:10, 6:10, 6:10] = 1
    image += label.float()
    return {"image": image, "label": label}


def parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def test_a_train_step_on_a_tensor_batch_learns():
    config = tiny_config(lr=3e-3)
    setup = build_setup(config, make_runtime("cpu", amp="off"))
    batch = tensor_batch()
    before = parameters(setup.model)
    first = train_step(setup, batch, lr=3e-3)
    assert first.finite and first.samples == 2 and math.isfinite(first.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, parameters(setup.model), strict=True))
    losses = [train_step(setup, batch, lr=3e-3).loss for _ in range(15)]
    assert losses[-1] < 0.8 * first.loss


def test_a_train_step_with_deep_supervision_takes_every_output_level():
    config = tiny_config()
    config = config.model_copy(update={"model": config.model.model_copy(update={"deep_supervision": 1})})
    setup = build_setup(config, make_runtime("cpu", amp="off"))
    result = train_step(setup, tensor_batch(), lr=1e-3)
    assert result.finite and math.isfinite(result.loss)


def test_fp16_on_the_cpu_scales_the_loss_and_clips_the_unscaled_gradient():
    config = tiny_config(amp="fp16", grad_clip=0.01)
    runtime = make_runtime("cpu", amp="fp16")
    setup = build_setup(config, runtime)
    assert runtime.amp_dtype == torch.float16 and setup.scaler is not None
    scale = setup.scaler.get_scale()
    result = train_step(setup, tensor_batch(), lr=1e-3)
    assert result.finite and math.isfinite(result.loss)
    # The gradients left behind were unscaled before clipping: their norm is grad_clip, not
    # grad_clip x the loss scale.
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in setup.model.parameters()]))
    assert norm == pytest.approx(0.01, rel=1e-2)
    assert setup.scaler.get_scale() == scale  # no overflow: the scale holds

    # An overflowing step is skipped by the scaler, which halves its scale.
    before = parameters(setup.model)
    poisoned = tensor_batch()
    poisoned["image"][0, 0, 0, 0, 0] = float("inf")
    assert not train_step(setup, poisoned, lr=1e-3).finite
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(setup.model), strict=True))
    assert setup.scaler.get_scale() == scale / 2


def test_the_moving_average_matches_its_ramped_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    averaged = MovingAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for update in range(1, 6):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model(torch.randn(8, 3))  # moves the batch-norm statistics and its counter
        averaged.update_parameters(model)
        if update == 1:
            expected = [p.detach().clone() for p in model.parameters()]
        else:
            n = update - 1
            rate = min(0.9, (1 + n) / (10 + n))
            expected = [
                rate * e + (1 - rate) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)
            ]
    for mine, reference in zip(averaged.module.parameters(), expected, strict=True):
        torch.testing.assert_close(mine, reference)
    assert int(averaged.module[1].num_batches_tracked) == int(model[1].num_batches_tracked)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        self.events.append(("start", epoch, steps))

    def on_step_end(self, result) -> None:
        self.events.append(("step", round(result.loss, 6)))

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.events.append(("end", end.epoch, end.last, sorted(end.metrics)))

    def on_fit_end(self, stop_reason: str) -> None:
        self.events.append(("fit end", stop_reason))


def tensor_loader(cases: int = 4) -> DataLoader:
    """Random flips of fixed tensor cases, drawn in this process (no workers)."""
    samples = []
    for index in range(cases):
        batch = tensor_batch(seed=index, batch=1)
        samples.append({key: value[0] for key, value in batch.items()})
    dataset = Dataset(samples, transform=RandFlipd(("image", "label"), prob=0.5, spatial_axis=0))
    return DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0)


def validation_cases() -> list[dict[str, torch.Tensor]]:
    batch = tensor_batch(seed=99, batch=1)
    return [{key: value[0] for key, value in batch.items()}]


def test_fit_calls_the_callbacks_around_each_epoch_and_saves_what_improves(tmp_path):
    config = tiny_config(max_epochs=2)
    setup = build_setup(config, make_runtime("cpu", amp="off"))
    state = TrainingState(run_id="local", config_yaml="name: tiny\n")
    recorder = Recorder()
    best = BestModel(setup, tmp_path / "best")
    callbacks = [recorder, Validation(setup, validation_cases(), config.label_names, state), best]
    callbacks.append(Checkpoint(setup, state, tmp_path))
    assert fit(setup, tensor_loader(), state, callbacks) == "2 epochs done"
    kinds = [event[0] for event in recorder.events]
    assert kinds == ["start", "step", "step", "end", "start", "step", "step", "end", "fit end"]
    assert recorder.events[3][:3] == ("end", 1, False) and recorder.events[7][:3] == ("end", 2, True)
    assert {"train_loss", "lr", "epoch_seconds", "samples_per_second"} <= set(recorder.events[3][3])
    assert state.epochs_done == 2 and state.global_step == 4
    assert state.best_epoch in (1, 2) and set(state.best_dice) == {"label 1", "label 2"}
    assert (tmp_path / "best" / "config.yaml").is_file()
    assert load_checkpoint(tmp_path)["state"].epochs_done == 2


def test_a_time_budget_stops_after_the_epoch_that_spends_it():
    assert TimeBudget(1.0).stop_reason(59.0) is None
    assert TimeBudget(1.0).stop_reason(60.0) == "time budget of 1.0 min reached"
    config = tiny_config(max_epochs=50)
    setup = build_setup(config, make_runtime("cpu", amp="off"))
    state = TrainingState(run_id="local", config_yaml="")
    state.elapsed_seconds = 3600.0  # a resumed run whose budget is already spent
    recorder = Recorder()
    reason = fit(setup, tensor_loader(), state, [recorder, TimeBudget(1.0)])
    assert reason == "time budget of 1.0 min reached" and state.epochs_done == 1
    assert recorder.events[-2][:3] == ("end", 1, True)


def test_ranks_draw_different_numbers_and_an_epoch_draws_the_same_ones_again():
    assert len({rank_seed(0, rank, epoch) for rank in range(4) for epoch in range(4)}) == 16
    seed_epoch(0, 0, 3)
    rank0 = torch.rand(4)
    seed_epoch(0, 1, 3)
    rank1 = torch.rand(4)
    seed_epoch(0, 0, 3)
    assert torch.equal(torch.rand(4), rank0) and not torch.equal(rank0, rank1)


class StopAfterFirstEpoch(Callback):
    """Ctrl-C, as it lands once the first epoch is saved."""

    def on_epoch_end(self, end: EpochEnd) -> None:
        raise KeyboardInterrupt


def test_a_resumed_fit_draws_what_the_uninterrupted_one_drew(tmp_path):
    """Skip dropout (torch's generator) and the flips (MONAI's own) of epoch 2 are the same
    whether the run went on or was rebuilt from its checkpoint after epoch 1."""
    config = tiny_config(max_epochs=2)
    runtime = make_runtime("cpu", amp="off")

    def fresh_setup(checkpoint=None):
        seed_epoch(config.trainer.seed, 0, 0)
        return build_setup(config, runtime, checkpoint=checkpoint)

    straight, straight_state = Recorder(), TrainingState(run_id="a", config_yaml="")
    fit(fresh_setup(), tensor_loader(), straight_state, [straight])

    first_state = TrainingState(run_id="b", config_yaml="")
    setup = fresh_setup()
    with pytest.raises(KeyboardInterrupt):
        fit(
            setup,
            tensor_loader(),
            first_state,
            [Checkpoint(setup, first_state, tmp_path), StopAfterFirstEpoch()],
        )
    checkpoint = load_checkpoint(tmp_path)
    resumed = Recorder()
    fit(fresh_setup(checkpoint), tensor_loader(), checkpoint["state"], [resumed])
    second_epoch = [event for event in straight.events[4:] if event[0] == "step"]
    assert [event for event in resumed.events if event[0] == "step"] == second_epoch


def test_determinism_defaults_to_autotuning_only_for_fixed_shape_batches_on_cuda():
    whole_volumes = tiny_config()
    patches = whole_volumes.model_copy(
        update={"data": whole_volumes.data.model_copy(update={"patch_size": (16, 16, 16)})}
    )
    assert resolve_deterministic(patches, on_cuda=True) is False
    assert resolve_deterministic(whole_volumes, on_cuda=True) is True
    assert resolve_deterministic(patches, on_cuda=False) is True
    chosen = patches.model_copy(
        update={"trainer": patches.trainer.model_copy(update={"deterministic": True})}
    )
    assert resolve_deterministic(chosen, on_cuda=True) is True


def test_the_norm_kernels_agree_in_both_layouts():
    config = tiny_config()
    volume = torch.randn(2, 1, 16, 16, 16)
    outputs = []
    for channels_last in (True, False):
        for kernel in ("group", "instance"):
            torch.manual_seed(0)
            setup = build_setup(config, make_runtime("cpu", "off", channels_last, kernel))
            setup.model.eval()
            outputs.append(setup.model(setup.runtime.to_device(volume), [1, 1]))
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], atol=1e-4, rtol=1e-4)


# Two gloo processes. Each entry point runs in a spawned child: it joins the group, does its
# part and writes what it saw to a JSON file named by its rank.


def _join(rank: int, port: int) -> Distributed:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    return Distributed(rank=rank, world_size=2, local_rank=rank)


def _clock_rank(rank: int, port: int, out: str) -> None:
    distributed = _join(rank, port)
    # Each rank's own clock reads differently; the schedule must not.
    own = [100.0 * (rank + 1)]
    clock = TrainingClock(distributed, elapsed_before=5.0 * rank, now=lambda: own[0])
    own[0] += 7.0 * (rank + 1)
    Path(out, f"{rank}.json").write_text(json.dumps(clock.elapsed()))
    torch.distributed.destroy_process_group()


def _download_rank(rank: int, port: int, out: str, data_root: str, tar_uri: str, md5: str) -> None:
    msd.TASKS[HIPPOCAMPUS], msd.MD5[HIPPOCAMPUS] = tar_uri, md5
    distributed = _join(rank, port)
    config = ExperimentConfig(name="x", data={"task": HIPPOCAMPUS, "val_fraction": 0.25})
    try:
        split = split_on_every_rank(config.data, Path(data_root), distributed)
        seen = {"train": len(split.train), "val": len(split.val)}
    except Exception as error:  # the parent asserts on what each rank saw
        seen = {"error": str(error)}
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


def _run_two(entry, tmp_path: Path, *args) -> list:
    out = tmp_path / "seen"
    out.mkdir()
    mp.spawn(entry, args=(free_port(), str(out), *args), nprocs=2, join=True)
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_every_rank_reads_rank_zeros_clock(tmp_path):
    assert _run_two(_clock_rank, tmp_path) == [7.0, 7.0]


@pytest.mark.slow
def test_a_missing_task_is_fetched_once_per_node_while_the_other_rank_waits(tmp_path, hippocampus_root):
    source = hippocampus_root / HIPPOCAMPUS
    task = tmp_path / "build" / HIPPOCAMPUS
    cases = sorted((source / "imagesTr").glob("hippocampus_*.nii.gz"))[:4]
    for folder in ("imagesTr", "labelsTr"):
        (task / folder).mkdir(parents=True)
        for case in cases:
            shutil.copy(source / folder / case.name, task / folder / case.name)
    listing = [{"image": f"./imagesTr/{c.name}", "label": f"./labelsTr/{c.name}"} for c in cases]
    (task / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}, "training": listing})
    )
    tar = tmp_path / f"{HIPPOCAMPUS}.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(task, arcname=HIPPOCAMPUS)
    md5 = hashlib.md5(tar.read_bytes()).hexdigest()
    data_root = tmp_path / "data"
    seen = _run_two(_download_rank, tmp_path, str(data_root), tar.as_uri(), md5)
    assert seen == [{"train": 3, "val": 1}, {"train": 3, "val": 1}]
    assert sorted(p.name for p in data_root.iterdir()) == [HIPPOCAMPUS]  # one download, no leftovers


def patch_config(loader: str) -> ExperimentConfig:
    return load_config(
        ROOT / "configs" / "hippocampus_3d.yaml",
        [
            *tiny_hippocampus_overrides(cases=6),
            "data.patch_size=[24,24,24]",
            "data.patches_per_volume=2",
            f"data.loader={loader}",
        ],
    )


@pytest.mark.parametrize("loader", ["device", "workers"])
def test_both_loaders_crop_patches_by_label_from_cached_cases(loader, hippocampus_root):
    config = patch_config(loader)
    split = split_task(config.data, hippocampus_root)
    runtime = make_runtime("cpu", amp="off")
    batches = training_loader(config, split, runtime)
    assert isinstance(batches, DeviceLoader) == (loader == "device")
    tracking = get_track_meta()
    seen = list(batches)
    assert get_track_meta() == tracking  # back on for validation and prediction
    samples = sum(batch["image"].shape[0] for batch in seen)
    assert samples == 2 * 2 * (len(split.train) // 2)  # two patches per case, whole batches
    for batch in seen:
        assert set(batch) == {"image", "label"}  # the cached label indices stay behind
        assert batch["image"].shape[1:] == (1, 24, 24, 24) and batch["image"].dtype == torch.float32
        assert type(batch["image"]) is torch.Tensor  # no metadata carried into training
    # pos=1, neg=1: about half the patches are centred on a labelled voxel.
    with_labels = [bool(label.any()) for batch in seen for label in batch["label"]]
    assert sum(with_labels) >= len(with_labels) // 2
    setup = build_setup(config, runtime)
    state = TrainingState(run_id="local", config_yaml="")
    assert fit(setup, batches, state, []) == "1 epochs done"
