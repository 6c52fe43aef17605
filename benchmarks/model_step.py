"""Forward+backward time of our 3D U-Net against MONAI's BasicUNet and UNet, side by side.

BasicUNet is the like-for-like peer: two convolutions per level, a full-resolution first level
and concatenative skips, built here with the same channels per level. MONAI's UNet downsamples
in its first convolution (no full-resolution skip), so its ratio is printed for information.

    make bench            # or: python benchmarks/model_step.py --config configs/hippocampus_3d.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import BasicUNet
from monai.networks.nets import UNet as MonaiUNet

from segment.config import load_config
from segment.models import build_model


def seconds_per_step(model: torch.nn.Module, batch: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall time of one forward+backward+SGD step, after warm-up."""
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for step in range(warmup + repeats):
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        model(batch).float().mean().backward()
        optimiser.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/hippocampus_3d.yaml")
    parser.add_argument("--shape", default="2,48,64,48", help="batch,D,H,W of the input")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = load_config(args.config).model
    batch_size, *spatial = (int(v) for v in args.shape.split(","))
    batch = torch.randn(batch_size, spec.in_channels, *spatial)
    widths = spec.widths

    ours = build_model(spec.model_copy(update={"skip_dropout": 0.0}))
    basic = BasicUNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        features=(*widths, widths[0]),
    )
    monai_unet = MonaiUNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=widths,
        strides=(2,) * (len(widths) - 1),
        num_res_units=2,
    )
    print(
        f"input {tuple(batch.shape)}, torch threads {torch.get_num_threads()}, "
        f"{args.warmup} warm-up + {args.repeats} timed steps, median"
    )
    # Interleave the models so machine noise hits them alike.
    results: dict[str, list[float]] = {"ours": [], "BasicUNet": [], "MONAI UNet": []}
    models = {"ours": ours, "BasicUNet": basic, "MONAI UNet": monai_unet}
    for _ in range(2):
        for name, model in models.items():
            results[name].append(seconds_per_step(model, batch, args.warmup, args.repeats))
    best = {name: min(times) for name, times in results.items()}
    for name, model in models.items():
        print(f"{name:>11}: {best[name]:.4f} s/step, {parameter_count(model):,} parameters")
    print(f"model_step_ratio_vs_monai: {best['ours'] / best['BasicUNet']:.3f}")
    print(f"model_step_ratio_vs_monai_unet (information): {best['ours'] / best['MONAI UNet']:.3f}")


if __name__ == "__main__":
    main()
