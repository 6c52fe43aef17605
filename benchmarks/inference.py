"""Seconds per hippocampus volume on this machine, after warm-up: the network alone and the whole
path (read the file, orient and normalise, predict, map back, write the mask). In fp32 on the CPU
the network is also timed with PyTorch's own choice of convolution kernel, side by side with
ours (every convolution through oneDNN, segment/engine/device.py).

    make bench            # all sections; or alone: python benchmarks/inference.py [--quick]
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import Row, finish, precision, section_parser

from segment.data.tasks import resolve_data_root
from segment.engine.device import make_runtime
from segment.engine.inference import predict_logits
from segment.engine.predict import prepare
from segment.io import read_scan, write_mask
from segment.models import load_model
from segment.models.sources import resolve_model


def measure(model_spec: str, cases: int, warmup: int, data_root: str | None) -> dict:
    model, config = load_model(resolve_model(model_spec))
    runtime = make_runtime("cpu", config.trainer.amp, config.trainer.channels_last)
    reference = None
    if runtime.onednn_convolutions:
        reference_runtime = dataclasses.replace(runtime, onednn_convolutions=False)
        reference = reference_runtime.prepare_model(copy.deepcopy(model))
    model = runtime.prepare_model(model)
    images = sorted((resolve_data_root(data_root) / config.data.task / "imagesTr").glob("*.nii.gz"))
    if len(images) < cases:
        raise SystemExit(
            f"Fewer than {cases} {config.data.task} images under the data root; set SEGMENT_DATA_ROOT."
        )
    network_seconds, total_seconds, reference_seconds = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        # The warm-up volumes are the first timed ones too: same sizes, so the same kernels.
        for index, image in enumerate([*images[:warmup], *images[:cases]]):
            start = time.perf_counter()
            scan = read_scan(image)
            prepared = prepare(scan, config)
            network_start = time.perf_counter()
            logits = predict_logits(model, prepared.volume, runtime, config.trainer.roi_size)
            labels = logits.argmax(dim=1)
            network_end = time.perf_counter()
            write_mask(prepared.restore(labels), scan, Path(folder) / image.name, config.label_names)
            if index >= warmup:
                network_seconds.append(network_end - network_start)
                total_seconds.append(time.perf_counter() - start)
            if reference is not None:
                reference_start = time.perf_counter()
                predict_logits(reference, prepared.volume, runtime, config.trainer.roi_size)
                if index >= warmup:
                    reference_seconds.append(time.perf_counter() - reference_start)
    return {
        "model": model_spec,
        "task": config.data.task,
        "volumes": cases,
        "warmup_volumes": warmup,
        "precision": precision(runtime),
        "torch_threads": torch.get_num_threads(),
        "network_seconds_per_volume": round(statistics.median(network_seconds), 4),
        "file_to_mask_seconds_per_volume": round(statistics.median(total_seconds), 4),
        "pytorch_kernel_choice_network_seconds_per_volume": (
            round(statistics.median(reference_seconds), 4) if reference_seconds else None
        ),
    }


def rows(result: dict) -> list[Row]:
    where = f"{result['model']}, median of {result['volumes']} volumes, {result['precision']}"
    table = [
        (f"network seconds per hippocampus volume ({where})", f"{result['network_seconds_per_volume']:.3f}"),
        ("file to mask seconds per hippocampus volume", f"{result['file_to_mask_seconds_per_volume']:.3f}"),
    ]
    reference = result.get("pytorch_kernel_choice_network_seconds_per_volume")
    if reference is not None:
        ratio = reference / result["network_seconds_per_volume"]
        table.append(
            ("network seconds per volume, PyTorch's own convolution kernels (reference)", f"{reference:.3f} ({ratio:.1f}x ours)")
        )
    return table


def main() -> None:
    parser = section_parser(__doc__)
    parser.add_argument("--model", default="hippocampus_3d")
    parser.add_argument("--cases", type=int, help="timed volumes (default 20; quick 2)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    result = measure(
        args.model, args.cases or (2 if args.quick else 20), 1 if args.quick else 3, args.data_root
    )
    finish(args, result, rows)


if __name__ == "__main__":
    main()
