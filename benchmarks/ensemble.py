"""Validation Dice of several hippocampus models, each alone and averaged (the mean of their
softmax outputs), side by side on the first model's validation split. Scored as
`segment evaluate --split val` scores: each mask mapped back onto the scan's own grid.

    python benchmarks/ensemble.py hippocampus_3d runs/<id>/best runs/<id>/best [--data-root DIR]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import print_table

from segment.data.tasks import resolve_data_root, split_task
from segment.engine.device import make_runtime
from segment.engine.inference import predict_logits
from segment.engine.metrics import mean_scores, score_case
from segment.engine.preparation import prepare
from segment.io import read_scan
from segment.models import as_segmenter, load_members, split_mismatch
from segment.models.sources import resolve_model

ENSEMBLE = "mean of softmax"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="bundled names, MLflow URIs or model directories")
    parser.add_argument("--data-root", help="holds Task04_Hippocampus (default: SEGMENT_DATA_ROOT)")
    args = parser.parse_args()
    members_per_model = [load_members(resolve_model(spec)) for spec in args.models]
    # Every member counts: an ensemble argument may join folds that validated on different cases.
    member_configs = [member_config for members in members_per_model for _, member_config in members]
    if (setting := split_mismatch(member_configs)) is not None:
        parser.error(
            f"the models were validated on different cases ({setting} differs): none is held out from all"
        )
    loaded = [as_segmenter(members) for members in members_per_model]
    config = loaded[0][1]
    runtime = make_runtime("cpu", config.trainer.amp, config.trainer.channels_last)
    networks = [runtime.prepare_model(network) for network, _ in loaded]
    task = split_task(config.data, resolve_data_root(args.data_root), download=False)
    scores: dict[str, list] = {name: [] for name in [*args.models, ENSEMBLE]}
    for case in task.val:
        scan, label = read_scan(case["image"]), read_scan(case["label"])
        truth = label.array.round().astype(np.int64)
        prepared = prepare(scan, config)
        probabilities = [
            predict_logits(network, prepared.volume, runtime, config).softmax(dim=1) for network in networks
        ]
        candidates = [*probabilities, torch.stack(probabilities).mean(0)]
        for name, member in zip([*args.models, ENSEMBLE], candidates, strict=True):
            mask = prepared.restore(member.argmax(dim=1))
            scores[name].append(score_case(case["image"], mask, truth, scan, task.label_names))
    rows = []
    for name, cases in scores.items():
        dice = mean_scores(cases, "dice")
        per_label = " / ".join(f"{label} {value:.4f}" for label, value in dice.items())
        rows.append((name, f"{np.mean(list(dice.values())):.4f} ({per_label})"))
    print(f"Mean validation Dice over {len(task.val)} cases of {config.data.task}:")
    print_table(rows)


if __name__ == "__main__":
    main()
