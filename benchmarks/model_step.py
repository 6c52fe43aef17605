"""Training-step time of our 3D U-Net against MONAI's BasicUNet and UNet, side by side, with the
FLOP rate each reaches; and our model's inference forward as segment runs it.

BasicUNet is the like-for-like peer: two convolutions per level, a full-resolution first level
and concatenative skips, built here with the same channels per level. MONAI's UNet downsamples
in its first convolution (no full-resolution skip), so its ratio is printed for information.

    make bench            # all sections; or alone: python benchmarks/model_step.py [--quick]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from common import ROOT, Row, describe_machine, finish, percent_of, precision, section_parser, shape_label
from monai.networks.nets import BasicUNet
from monai.networks.nets import UNet as MonaiUNet
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from segment.config import load_config
from segment.engine.device import Runtime, make_runtime
from segment.models import build_model

Step = Callable[[], None]
# JSON key -> name in the table.
MODELS = {"ours": "ours", "monai_basic_unet": "MONAI BasicUNet", "monai_unet": "MONAI UNet"}


def training_step(model: torch.nn.Module, batch: torch.Tensor) -> Step:
    """One forward+backward+SGD step, in fp32."""
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        model(batch).float().mean().backward()
        optimiser.step()

    return step


def inference_step(model: torch.nn.Module, batch: torch.Tensor, runtime: Runtime) -> Step:
    """One forward pass with the layout and precision segment predicts with."""
    model = runtime.prepare_model(model).eval()
    batch = runtime.to_device(batch)

    @torch.inference_mode()
    def step() -> None:
        with runtime.autocast():
            model(batch)

    return step


def interleaved_seconds(steps: dict[str, Step], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each step after warm-up. The steps take turns, one at a time, so
    machine noise hits them alike; the order rotates so none always follows the same one."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        turn = repeat % len(names)
        for name in names[turn:] + names[:turn]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _onednn_convolution_flops(x_shape, w_shape, bias, padding, stride, dilation, groups, out_shape=None, **_):
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def counted_flops(step: Step) -> int:
    """FLOPs of one step as torch counts them: convolutions and matrix products (two per
    multiply-add); normalisation, activations and the optimiser update are not counted.
    torch's counter knows ``aten.convolution`` only, so the direct oneDNN calls segment makes
    on fp32 CPUs (segment/engine/device.py) are counted the same way here."""
    mapping = {torch.ops.aten.mkldnn_convolution: _onednn_convolution_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


def measure(config: str, shape: str, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    spec = load_config(config).model
    batch_size, *spatial = (int(v) for v in shape.split(","))
    batch = torch.randn(batch_size, spec.in_channels, *spatial)
    widths = spec.widths
    # No skip dropout: every step then does the same work, all skips on.
    spec = spec.model_copy(update={"skip_dropout": 0.0})
    models = {
        "ours": build_model(spec),
        "monai_basic_unet": BasicUNet(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            features=(*widths, widths[0]),
        ),
        "monai_unet": MonaiUNet(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            channels=widths,
            strides=(2,) * (len(widths) - 1),
            num_res_units=2,
        ),
    }
    runtime = make_runtime("cpu")
    steps = {name: training_step(model, batch) for name, model in models.items()}
    steps["inference"] = inference_step(build_model(spec), batch, runtime)
    seconds = interleaved_seconds(steps, warmup, repeats)
    flops = {name: counted_flops(step) for name, step in steps.items()}

    machine = describe_machine()

    def figures(name: str, peak: float | None) -> dict:
        gflops = flops[name] / seconds[name] / 1e9
        return {
            "seconds_per_step": round(seconds[name], 5),
            "samples_per_second": round(batch_size / seconds[name], 2),
            "gflop_per_step": round(flops[name] / 1e9, 3),
            "gflops": round(gflops, 2),
            "percent_of_peak": percent_of(gflops, peak),
        }

    trained = {
        name: figures(name, machine["peak_fp32_gflops"])
        | {"parameters": sum(p.numel() for p in model.parameters())}
        for name, model in models.items()
    }
    computed_in = precision(runtime)
    return {
        "input_shape": list(batch.shape),
        "channels": list(widths),
        "torch_threads": torch.get_num_threads(),
        "warmup_steps": warmup,
        "timed_steps": repeats,
        "model_step_ratio_vs_monai": round(seconds["ours"] / seconds["monai_basic_unet"], 3),
        "model_step_ratio_vs_monai_unet": round(seconds["ours"] / seconds["monai_unet"], 3),
        "training_fp32": trained,
        "inference_ours": figures("inference", machine[f"peak_{computed_in}_gflops"])
        | {"precision": computed_in},
    }


def rows(result: dict) -> list[Row]:
    trained = result["training_fp32"]

    def per_step(name: str) -> str:
        return f"{trained[name]['seconds_per_step']:.3f} s"

    def rate(figures: dict, peak: str) -> str:
        percent = figures["percent_of_peak"]
        of_peak = "(peak unknown)" if percent is None else f"= {percent:.1f} % of {peak} peak"
        return (
            f"{figures['samples_per_second']:.1f} samples/s, {figures['gflop_per_step']:.1f} GFLOP, "
            f"{figures['gflops']:.1f} GFLOP/s {of_peak}"
        )

    shape = shape_label(result["input_shape"])
    channels = f"{result['channels'][0]}-{result['channels'][-1]} channels"
    table = [
        (
            f"`model_step_ratio_vs_monai` (ours / BasicUNet, fp32 training step, {shape}, {channels})",
            f"{result['model_step_ratio_vs_monai']:.3f} "
            f"({per_step('ours')} vs {per_step('monai_basic_unet')} per step)",
        ),
        (
            "ours / MONAI `UNet` (information)",
            f"{result['model_step_ratio_vs_monai_unet']:.2f} "
            f"({per_step('ours')} vs {per_step('monai_unet')} per step)",
        ),
    ]
    table += [
        (f"training step, {label}", f"{per_step(name)}, {rate(trained[name], 'fp32')}")
        for name, label in MODELS.items()
    ]
    inference = result["inference_ours"]
    computed_in = inference["precision"]
    table.append(
        (
            f"inference forward, ours, {computed_in}, channels-last, same input",
            f"{inference['seconds_per_step']:.3f} s, {rate(inference, computed_in)}",
        )
    )
    return table


def main() -> None:
    parser = section_parser(__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "hippocampus_3d.yaml"))
    parser.add_argument("--shape", help="batch,D,H,W of the input (default 2,48,64,48; quick 1,32,32,32)")
    parser.add_argument("--warmup", type=int, help="untimed steps per model (default 3; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed steps per model (default 20; quick 2)")
    args = parser.parse_args()
    result = measure(
        args.config,
        args.shape or ("1,32,32,32" if args.quick else "2,48,64,48"),
        args.warmup if args.warmup is not None else (2 if args.quick else 3),
        args.repeats or (2 if args.quick else 20),
    )
    finish(args, result, rows)


if __name__ == "__main__":
    main()
