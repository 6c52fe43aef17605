"""Training and inference on one CUDA GPU: our step against MONAI's BasicUNet for each norm
kernel and memory layout, the loader against the step, hippocampus_3d trained from scratch
against MONAI's tutorial recipe on the same data and budget, and inference times.

    python benchmarks/gpu.py [--data-root DIR] [--train-minutes 2.5] [--json-out FILE]

Writes ``benchmarks/results/gpu.json`` by default; needs no network and no MLflow. On a machine
without CUDA it says so and exits 0. ``benchmarks/gpu_wheels.sh`` fetches the wheels a bare
PyTorch machine lacks (docs/benchmarks.md, "On a GPU")."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from model_step import interleaved_seconds
from monai.networks.nets import BasicUNet
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

from segment.config import ExperimentConfig, load_config
from segment.data.loaders import training_loader, validation_dataset
from segment.data.tasks import resolve_data_root, split_task
from segment.engine.device import Runtime, make_runtime
from segment.engine.inference import predict_logits
from segment.training.callbacks import Callback, EpochEnd, TimeBudget, Validation
from segment.training.checkpoint import TrainingState
from segment.training.loop import fit
from segment.training.seeding import configure_cudnn, resolve_deterministic, seed_epoch
from segment.training.setup import TrainingSetup, build_setup, training_loss
from segment.training.step import train_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "hippocampus_3d.yaml"
NO_CUDA = "PyTorch sees no CUDA GPU on this machine, so there is nothing for benchmarks/gpu.py to measure."
# (what, batch size, spatial size): hippocampus crops are at most 43 x 59 x 47 voxels.
STEP_SHAPES = (
    ("hippocampus volume", 2, (40, 56, 40)),
    ("96^3 patch", 2, (96, 96, 96)),
    ("96^3 patch", 8, (96, 96, 96)),
)
VARIANTS = tuple(
    (layout, kernel) for layout in ("channels-first", "channels-last") for kernel in ("instance", "group")
)
DICE_TARGETS = (0.87, 0.89)


def make_setup(config: ExperimentConfig, runtime: Runtime, network: nn.Module | None = None) -> TrainingSetup:
    """Our setup for ``config``, or the same recipe around another ``network``."""
    if network is None:
        return build_setup(config, runtime)
    network = runtime.prepare_model(network)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.trainer.lr, fused=runtime.device.type == "cuda"
    )
    return TrainingSetup(config, runtime, network, network, optimiser, training_loss(config.trainer))


def basic_unet(config: ExperimentConfig) -> BasicUNet:
    """MONAI's like-for-like peer: two convolutions per level, concatenative skips, our widths."""
    widths = config.model.widths
    return BasicUNet(3, config.model.in_channels, config.model.out_channels, features=(*widths, widths[0]))


def step_times(config: ExperimentConfig, device: str, repeats: int = 10, shapes=STEP_SHAPES) -> list[dict]:
    """Seconds per training step (bf16 or the device's precision), ours and BasicUNet's taking
    turns, with the peak memory of each, for every shape and norm/layout variant."""
    config = config.model_copy(update={"model": config.model.model_copy(update={"skip_dropout": 0.0})})
    rows = []
    for what, batch_size, spatial in shapes:
        batch = {
            "image": torch.randn(batch_size, 1, *spatial),
            "label": torch.randint(
                0, config.model.out_channels, (batch_size, 1, *spatial), dtype=torch.uint8
            ),
        }
        for layout, kernel in VARIANTS:
            runtime = make_runtime(device, "auto", layout == "channels-last", kernel)
            setups = {
                "ours": make_setup(config, runtime),
                "basic_unet": make_setup(config, runtime, basic_unet(config)),
            }
            steps = {
                name: (lambda s=setup, b=batch: train_step(s, b, 1e-4)) for name, setup in setups.items()
            }
            seconds = interleaved_seconds(steps, warmup=3, repeats=repeats)
            row = {"shape": what, "batch": batch_size, "layout": layout, "norm_kernel": kernel}
            for name, value in seconds.items():
                row[f"{name}_seconds"] = value
                row[f"{name}_samples_per_second"] = batch_size / value
            row["ours_vs_basic_unet"] = seconds["ours"] / seconds["basic_unet"]
            row["peak_memory_gb"] = peak_memory_gb(device)
            rows.append(row)
            del setups, steps
    return rows


def peak_memory_gb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def compiled_step(config: ExperimentConfig, device: str, repeats: int = 10) -> dict:
    """torch.compile against eager, on the 96^3 patches at batch 2, in the device's defaults."""
    _, batch_size, spatial = STEP_SHAPES[1]
    batch = {
        "image": torch.randn(batch_size, 1, *spatial),
        "label": torch.zeros(batch_size, 1, *spatial, dtype=torch.uint8),
    }
    runtime = make_runtime(device)
    eager = make_setup(config, runtime)
    compiled_config = config.model_copy(
        update={"trainer": config.trainer.model_copy(update={"compile": True})}
    )
    compiled = make_setup(compiled_config, runtime)
    start = time.perf_counter()
    train_step(compiled, batch, 1e-4)
    compile_seconds = time.perf_counter() - start
    seconds = interleaved_seconds(
        {
            "eager": lambda: train_step(eager, batch, 1e-4),
            "compiled": lambda: train_step(compiled, batch, 1e-4),
        },
        warmup=2,
        repeats=repeats,
    )
    return {"first_step_seconds": compile_seconds, **{f"{k}_seconds": v for k, v in seconds.items()}}


class DiceClock(Callback):
    """When each Dice target was first reached, in seconds of training."""

    def __init__(self, state: TrainingState) -> None:
        self._state = state
        self.reached: dict[str, float | None] = {str(target): None for target in DICE_TARGETS}
        self.history: list[tuple[float, float]] = []
        self.train_samples_per_second: list[float] = []

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.train_samples_per_second.append(end.metrics["samples_per_second"])
        dice = end.metrics.get("val_mean_dice")
        if dice is None:
            return
        self.history.append((round(self._state.elapsed_seconds, 1), round(dice, 4)))
        for target in DICE_TARGETS:
            if dice >= target and self.reached[str(target)] is None:
                self.reached[str(target)] = round(self._state.elapsed_seconds, 1)


class SkipMaskIgnored(nn.Module):
    """MONAI's UNet in our inference path: padded to a multiple of its 16x downsampling, the
    skip mask ignored (it has no switches)."""

    def __init__(self, network: nn.Module, config: ExperimentConfig) -> None:
        super().__init__()
        self.network, self.config = network, config.model

    def forward(self, image: torch.Tensor, skip_mask=None) -> torch.Tensor:
        size = image.shape[2:]
        padding = [p for s in reversed(size) for p in (0, -s % 16)]
        return self.network(nn.functional.pad(image, padding))[(..., *(slice(0, s) for s in size))]


def monai_tutorial_recipe(config: ExperimentConfig) -> tuple[ExperimentConfig, nn.Module]:
    """MONAI's tutorial set-up: UNet 16-256 with residual units, DiceCE, AdamW at 1e-4, batch 4."""
    recipe = config.model_copy(
        update={
            "trainer": config.trainer.model_copy(update={"lr": 1e-4, "batch_size": 4, "warmup_epochs": 0})
        }
    )
    network = MonaiUNet(
        3,
        1,
        config.model.out_channels,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )
    return recipe, SkipMaskIgnored(network, config)


def train_for(
    config: ExperimentConfig, device: str, data_root: Path, minutes: float, network: nn.Module | None = None
) -> dict:
    """Train from scratch on the shared data for ``minutes``; validate every epoch."""
    trainer = config.trainer.model_copy(update={"max_minutes": minutes, "val_every": 1})
    config = config.model_copy(update={"trainer": trainer})
    runtime = make_runtime(device, trainer.amp, trainer.channels_last)
    configure_cudnn(resolve_deterministic(config, runtime.device.type == "cuda"))
    seed_epoch(trainer.seed, 0, 0)
    split = split_task(config.data, data_root, download=False)
    config = config.model_copy(update={"labels": split.label_names})
    on_device = "device" if runtime.device.type == "cuda" else "workers"
    config = config.model_copy(update={"data": config.data.model_copy(update={"loader": on_device})})
    start = time.perf_counter()
    loader = training_loader(config, split, runtime)
    val_cases = validation_dataset(config, split)
    cache_seconds = time.perf_counter() - start
    setup = make_setup(config, runtime, network)
    state = TrainingState(run_id="benchmark", config_yaml="")
    clock = DiceClock(state)
    callbacks = [TimeBudget(minutes), Validation(setup, val_cases, config.label_names, state), clock]
    fit(setup, loader, state, callbacks)
    return {
        "minutes": minutes,
        "loader": config.data.loader,
        "cache_seconds": round(cache_seconds, 1),
        "epochs": state.epochs_done,
        "best_mean_dice": round(state.best_mean_dice, 4),
        "seconds_to_dice": clock.reached,
        "dice_history": clock.history,
        # Does the GPU wait? The loader alone against the steps it feeds (median epoch).
        "train_samples_per_second": round(
            sorted(clock.train_samples_per_second)[len(clock.train_samples_per_second) // 2], 1
        ),
        "loader_samples_per_second": loader_throughput(loader),
        "_setup": setup,
        "_val_cases": val_cases,
    }


def loader_throughput(loader) -> float:
    """Samples per second the loader makes alone, over one epoch (the GPU idle)."""
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["image"].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(samples / (time.perf_counter() - start), 1)


def inference_seconds(setup: TrainingSetup, val_cases, large: tuple[int, ...] = (512, 512, 100)) -> dict:
    """Seconds per whole hippocampus volume, and per ``large`` volume by 96^3 sliding window."""
    model, runtime, config = setup.kept_model, setup.runtime, setup.config
    volume = val_cases[0]["image"][None]
    windowed = config.model_copy(
        update={"trainer": config.trainer.model_copy(update={"roi_size": (96, 96, 96), "sw_batch_size": 8})}
    )
    seconds = interleaved_seconds(
        {
            "hippocampus_volume": lambda: predict_logits(model, volume, runtime, config),
            "sliding_window": lambda: predict_logits(model, torch.randn(1, 1, *large), runtime, windowed),
        },
        warmup=1,
        repeats=3,
    )
    return {f"{name}_seconds": round(value, 4) for name, value in seconds.items()} | {
        "sliding_window_volume": "x".join(map(str, large))
    }


def machine(device: str) -> dict:
    runtime = make_runtime(device)
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "runtime": runtime.describe(),
    }


def run(device: str, data_root: Path, train_minutes: float, repeats: int) -> dict:
    config = load_config(CONFIG)
    result = {"machine": machine(device), "steps": step_times(config, device, repeats)}
    ours = train_for(config, device, data_root, train_minutes)
    recipe, network = monai_tutorial_recipe(config)
    reference = train_for(recipe, device, data_root, train_minutes, network)
    result["inference"] = inference_seconds(ours.pop("_setup"), ours.pop("_val_cases"))
    reference.pop("_setup"), reference.pop("_val_cases")
    result["training"] = {"ours": ours, "monai_tutorial_recipe": reference}
    result["compile"] = compiled_step(config, device, repeats)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-root", type=Path, help="folder holding Task04_Hippocampus (default $SEGMENT_DATA_ROOT)"
    )
    parser.add_argument("--train-minutes", type=float, default=2.5, help="training budget of each recipe")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model and variant")
    parser.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    result = run("cuda", resolve_data_root(args.data_root), args.train_minutes, args.repeats)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
