"""Seconds for a CT-sized volume (512x512x100) through MONAI's sliding-window inference with the
bundled 3D model, as segment predicts (its overlap and Gaussian weighting), after a warm-up
run, with no progress bar.

The intensities are synthetic (standard normal, as a normalised scan is): the time of the
convolutions does not depend on the values, and the shipped models are not CT models.

    make bench            # all sections; or alone: python benchmarks/sliding_window.py [--quick]
"""

from __future__ import annotations

import statistics
import time

import torch
from common import Row, finish, precision, section_parser, shape_label

from segment.engine.device import make_runtime
from segment.engine.inference import predict_logits
from segment.models import load_model
from segment.models.sources import resolve_model


def measure(
    model_spec: str, shape: tuple[int, ...], roi_size: tuple[int, ...], sw_batch_size: int, repeats: int
) -> dict:
    model, config = load_model(resolve_model(model_spec))
    runtime = make_runtime("cpu", config.trainer.amp, config.trainer.channels_last)
    model = runtime.prepare_model(model)
    windowed = config.model_copy(
        update={"trainer": config.trainer.model_copy(update={"roi_size": roi_size, "sw_batch_size": sw_batch_size})}
    )
    volume = torch.randn(1, config.model.in_channels, *shape, generator=torch.Generator().manual_seed(0))
    seconds = []
    # The first run is warm-up: it meets every window batch shape of the timed runs.
    for run in range(1 + repeats):
        start = time.perf_counter()
        predict_logits(model, volume, runtime, windowed, progress=False).argmax(dim=1)
        if run:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "model": model_spec,
        "volume_shape": list(shape),
        "intensities": "synthetic, standard normal",
        "roi_size": list(roi_size),
        "sw_batch_size": sw_batch_size,
        "precision": precision(runtime),
        "torch_threads": torch.get_num_threads(),
        "timed_runs": repeats,
        "seconds_per_volume": round(median, 3),
        "megavoxels_per_second": round(volume[0, 0].numel() / median / 1e6, 3),
    }


def rows(result: dict) -> list[Row]:
    return [
        (
            f"sliding window to labels, {shape_label(result['volume_shape'])} synthetic volume "
            f"(roi {shape_label(result['roi_size'])}, sw_batch_size {result['sw_batch_size']}, {result['precision']})",
            f"{result['seconds_per_volume']:.2f} s ({result['megavoxels_per_second']:.2f} Mvoxel/s)",
        )
    ]


def main() -> None:
    parser = section_parser(__doc__)
    parser.add_argument("--model", default="hippocampus_3d")
    parser.add_argument("--shape", help="H,W,D of the volume (default 512,512,100; quick 128,128,48)")
    # About the largest hippocampus crop (43x59x47) the bundled model was trained on.
    parser.add_argument("--roi-size", default="48,64,48")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 3; quick 1)")
    args = parser.parse_args()
    shape = args.shape or ("128,128,48" if args.quick else "512,512,100")
    result = measure(
        args.model,
        tuple(int(v) for v in shape.split(",")),
        tuple(int(v) for v in args.roi_size.split(",")),
        args.sw_batch_size,
        args.repeats or (1 if args.quick else 3),
    )
    finish(args, result, rows)


if __name__ == "__main__":
    main()
