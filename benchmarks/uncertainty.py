"""Is the uncertainty map higher where the mask is wrong? The bundled hippocampus_3d on its own
validation split: mean entropy and disagreement on wrong voxels against right ones, and how well
each ranks wrong voxels above right ones (AUROC), over every voxel of every case and over the
voxels near the structure (within 3 voxels of the predicted or true foreground), where the
background far away cannot make the ranking look easy.

    python benchmarks/uncertainty.py [--data-root DIR] [--model M] [--member K] [--samples 8]

``--member K`` takes the K-th U-Net (from 1) of an ensemble alone: its uncertainty is then
Monte Carlo over skip settings instead of the members' disagreement.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import rankdata

from segment.data.tasks import resolve_data_root, split_task
from segment.engine.device import make_runtime
from segment.engine.inference import predict_labels
from segment.engine.preparation import prepare
from segment.engine.uncertainty import estimate
from segment.io import read_scan
from segment.models import load_model
from segment.models.sources import resolve_model

# Voxels within this many of the predicted or true foreground count as near the structure.
NEAR_VOXELS = 3


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The chance that a random positive scores above a random negative (ties count half)."""
    ranks = rankdata(scores)
    positives = int(positive.sum())
    negatives = positive.size - positives
    return float((ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="folder holding Task04_Hippocampus (default $SEGMENT_DATA_ROOT)")
    parser.add_argument("--model", default="hippocampus_3d")
    parser.add_argument("--samples", type=int, default=8, help="skip settings drawn per scan")
    parser.add_argument("--max-cases", type=int, help="score only the first N validation cases")
    parser.add_argument("--member", type=int, help="the K-th member of an ensemble alone (from 1)")
    args = parser.parse_args()
    network, config = load_model(resolve_model(args.model))
    if args.member is not None:
        network = network.members[args.member - 1]
    runtime = make_runtime("cpu")
    cases = split_task(config.data, resolve_data_root(args.data_root), download=False).val[: args.max_cases]
    wrong, near, entropy, disagreement = [], [], [], []
    source = ""
    for case in cases:
        scan, truth = read_scan(case["image"]), read_scan(case["label"]).array.round().astype(np.uint8)
        prepared = prepare(scan, config)
        labels = predict_labels(network, prepared, runtime, config)
        found = estimate(network, prepared.volume, runtime, config, samples=args.samples)
        maps = prepared.restore_maps(torch.cat([found.entropy, found.disagreement], dim=1))
        wrong.append((labels != truth).ravel())
        near.append(ndimage.binary_dilation((labels > 0) | (truth > 0), iterations=NEAR_VOXELS).ravel())
        entropy.append(maps[..., 0].ravel())
        disagreement.append(maps[..., 1].ravel())
        source = found.source
    wrong, near, entropy, disagreement = (np.concatenate(v) for v in (wrong, near, entropy, disagreement))
    result = {
        "model": args.model + (f", member {args.member}" if args.member else ""),
        "cases": len(cases),
        "samples": source,
        "voxels": int(wrong.size),
        "wrong_voxels": int(wrong.sum()),
        "voxels_near_the_structure": int(near.sum()),
    }
    for name, values in (("entropy", entropy), ("disagreement", disagreement)):
        result[name] = {
            "mean_on_wrong_voxels": float(values[wrong].mean()),
            "mean_on_right_voxels": float(values[~wrong].mean()),
            "auroc_wrong_vs_right": auroc(values, wrong),
            "auroc_near_the_structure": auroc(values[near], wrong[near]),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
