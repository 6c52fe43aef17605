"""Seconds per hippocampus volume through the exported ONNX graph in ONNX Runtime against the
same model in PyTorch as `segment` runs it (the network alone, prepared volumes), volume by
volume in turn, after warm-up.

    python benchmarks/graph_export.py [--model hippocampus_3d] [--cases 10] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from segment.data.tasks import resolve_data_root
from segment.engine.device import make_runtime
from segment.engine.inference import predict_logits
from segment.engine.preparation import prepare
from segment.io import read_scan
from segment.models import load_model
from segment.models.graph_export import export_graph
from segment.models.sources import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hippocampus_3d")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--data-root")
    args = parser.parse_args()
    network, config = load_model(resolve_model(args.model))
    runtime = make_runtime("cpu", config.trainer.amp, config.trainer.channels_last)
    prepared_network = runtime.prepare_model(load_model(resolve_model(args.model))[0])
    images = sorted((resolve_data_root(args.data_root) / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))
    volumes = [prepare(read_scan(path), config).volume for path in images[: args.cases]]
    mask = np.ones(network.num_skips, dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = export_graph(network, config, "onnx", Path(folder) / "model.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    steps = {
        "pytorch": lambda v: predict_logits(prepared_network, v, runtime, config),
        "onnx_runtime": lambda v: session.run(None, {"image": v.numpy(), "skip_mask": mask}),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(volumes[0])
    for volume in volumes:
        for name, step in steps.items():
            start = time.perf_counter()
            step(volume)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch threads {torch.get_num_threads()}, PyTorch runtime: {runtime.describe()}")
    for name, seconds in medians.items():
        print(f"{name}: {seconds:.3f} s per volume (median of {len(volumes)})")
    print(f"ONNX Runtime / PyTorch: {medians['onnx_runtime'] / medians['pytorch']:.2f}")


if __name__ == "__main__":
    main()
