"""Seconds per hippocampus volume on this machine, after warm-up: the network alone and the whole
path (read the file, orient and normalise, predict, map back, write the mask). The network is
also timed, volume by volume in turn, as plain PyTorch would run it, one choice of ours undone at
a time: PyTorch's own choice of convolution kernel in place of oneDNN's (fp32 CPUs only,
segment/engine/device.py), and PyTorch's InstanceNorm in place of ours (segment/models/blocks.py).

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
from torch import nn

from segment.data.tasks import resolve_data_root
from segment.engine.device import make_runtime
from segment.engine.inference import predict_logits
from segment.engine.preparation import prepare
from segment.io import read_scan, write_mask
from segment.models import load_model
from segment.models.blocks import InstanceNorm
from segment.models.sources import resolve_model

REFERENCES = {
    "pytorch_kernel_choice": "PyTorch's own convolution kernels",
    "pytorch_instance_norm": "PyTorch's InstanceNorm in place of ours",
}


def with_pytorch_instance_norm(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` with PyTorch's InstanceNormNd (same weights) in place of ours;
    None when the model has no instance norm."""
    if not any(isinstance(module, InstanceNorm) for module in model.modules()):
        return None
    model = copy.deepcopy(model)
    torch_norm_type = nn.InstanceNorm2d if model.config.spatial_dims == 2 else nn.InstanceNorm3d
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, InstanceNorm):
                torch_norm = torch_norm_type(child.num_channels, eps=child.eps, affine=child.affine)
                torch_norm.load_state_dict(child.state_dict())
                setattr(parent, name, torch_norm)
    return model


def measure(model_spec: str, cases: int, warmup: int, data_root: str | None) -> dict:
    model, config = load_model(resolve_model(model_spec))
    runtime = make_runtime("cpu", config.trainer.amp, config.trainer.channels_last)
    references = {}
    if runtime.onednn_convolutions:
        kernel_runtime = dataclasses.replace(runtime, onednn_convolutions=False)
        references["pytorch_kernel_choice"] = kernel_runtime.prepare_model(copy.deepcopy(model))
    if (torch_norm_model := with_pytorch_instance_norm(model)) is not None:
        references["pytorch_instance_norm"] = runtime.prepare_model(torch_norm_model)
    model = runtime.prepare_model(model)
    images = sorted((resolve_data_root(data_root) / config.data.task / "imagesTr").glob("*.nii.gz"))
    if len(images) < cases:
        raise SystemExit(
            f"Fewer than {cases} {config.data.task} images under the data root; set SEGMENT_DATA_ROOT."
        )
    network_seconds, total_seconds = [], []
    reference_seconds = {key: [] for key in references}
    with tempfile.TemporaryDirectory() as folder:
        # The warm-up volumes are the first timed ones too: same sizes, so the same kernels.
        for index, image in enumerate([*images[:warmup], *images[:cases]]):
            start = time.perf_counter()
            scan = read_scan(image)
            prepared = prepare(scan, config)
            network_start = time.perf_counter()
            logits = predict_logits(model, prepared.volume, runtime, config)
            labels = logits.argmax(dim=1)
            network_end = time.perf_counter()
            write_mask(prepared.restore(labels), scan, Path(folder) / image.name, config.label_names)
            if index >= warmup:
                network_seconds.append(network_end - network_start)
                total_seconds.append(time.perf_counter() - start)
            for key, reference in references.items():
                reference_start = time.perf_counter()
                predict_logits(reference, prepared.volume, runtime, config)
                if index >= warmup:
                    reference_seconds[key].append(time.perf_counter() - reference_start)
    return {
        "model": model_spec,
        "task": config.data.task,
        "volumes": cases,
        "warmup_volumes": warmup,
        "precision": precision(runtime),
        "torch_threads": torch.get_num_threads(),
        "network_seconds_per_volume": round(statistics.median(network_seconds), 4),
        "file_to_mask_seconds_per_volume": round(statistics.median(total_seconds), 4),
        **{
            f"{key}_network_seconds_per_volume": (
                round(statistics.median(reference_seconds[key]), 4) if key in reference_seconds else None
            )
            for key in REFERENCES
        },
    }


def rows(result: dict) -> list[Row]:
    where = f"{result['model']}, median of {result['volumes']} volumes, {result['precision']}"
    table = [
        (f"network seconds per hippocampus volume ({where})", f"{result['network_seconds_per_volume']:.3f}"),
        ("file to mask seconds per hippocampus volume", f"{result['file_to_mask_seconds_per_volume']:.3f}"),
    ]
    for key, what in REFERENCES.items():
        reference = result.get(f"{key}_network_seconds_per_volume")
        if reference is not None:
            ratio = reference / result["network_seconds_per_volume"]
            table.append(
                (f"network seconds per volume, {what} (reference)", f"{reference:.3f} ({ratio:.2f}x ours)")
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
