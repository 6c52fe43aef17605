"""Seconds per hippocampus volume on this machine: the network alone and the whole path
(read the file, orient and normalise, predict, map back, write the mask).

    make bench            # or: python benchmarks/inference.py --model hippocampus_3d --cases 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from segment.data.tasks import resolve_data_root
from segment.engine.device import make_runtime
from segment.engine.inference import predict_logits
from segment.engine.predict import prepare
from segment.io import read_scan, write_mask
from segment.models import load_model
from segment.models.sources import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hippocampus_3d")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()

    model, config = load_model(resolve_model(args.model))
    runtime = make_runtime("cpu", config.trainer.amp, config.trainer.channels_last)
    model = runtime.prepare_model(model)
    images = sorted((resolve_data_root(args.data_root) / config.data.task / "imagesTr").glob("*.nii.gz"))[
        : args.cases
    ]
    if not images:
        raise SystemExit(f"No {config.data.task} images under the data root; set SEGMENT_DATA_ROOT.")
    network_seconds, total_seconds = [], []
    with tempfile.TemporaryDirectory() as folder:
        for warmup in (True, False):
            for image in images[:3] if warmup else images:
                start = time.perf_counter()
                scan = read_scan(image)
                prepared = prepare(scan, config)
                network_start = time.perf_counter()
                logits = predict_logits(model, prepared.volume, runtime, config.trainer.roi_size)
                labels = logits.argmax(dim=1)
                network_end = time.perf_counter()
                write_mask(prepared.restore(labels), scan, Path(folder) / image.name, config.label_names)
                if not warmup:
                    network_seconds.append(network_end - network_start)
                    total_seconds.append(time.perf_counter() - start)
    print(
        f"{args.model} on {len(images)} {config.data.task} volumes, {runtime.describe()}, {torch.get_num_threads()} threads"
    )
    print(f"network_seconds_per_volume: {statistics.median(network_seconds):.4f}")
    print(f"file_to_mask_seconds_per_volume: {statistics.median(total_seconds):.4f}")


if __name__ == "__main__":
    main()
