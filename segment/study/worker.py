"""One study job in its own process, a training or an analysis: ``python -m
segment.study.worker SPEC_JSON``, started by :mod:`.runner`. A process per job keeps each one's
threads, memory and CPU time its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlflow import MlflowClient

from segment.config import load_config
from segment.errors import SegmentError
from segment.training.run import TrainingInterrupted
from segment.training.run import train as run_training


def analyse(spec: dict) -> int:
    from segment.study.analysis import analyse_run

    roots = [Path(root) for root in spec["data_roots"]]
    try:
        analyse_run(spec["run_id"], spec["variant"], roots, spec["tracking_uri"])
    except SegmentError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(f"Analysed run {spec['run_id']}")
    return 0


def train(spec: dict) -> int:
    where = {
        "data_root": spec["data_root"],
        "tracking_uri": spec["tracking_uri"],
        "output_root": spec["output_dir"],
        "progress": False,
    }
    try:
        if spec.get("resume"):
            result = run_training(resume=spec["resume"], **where)
        else:
            config = load_config(Path(spec["config"]), spec["overrides"])
            result = run_training(config, run_name=spec["run_name"], **where)
    except TrainingInterrupted as stopped:
        print(stopped, file=sys.stderr)
        return 130
    except SegmentError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    client = MlflowClient()
    for key, value in spec["tags"].items():
        client.set_tag(result.run_id, key, value)
    print(f"Finished run {result.run_id}: best validation Dice {result.best_mean_dice:.4f}")
    return 0


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    sys.exit(train(job) if job["kind"] == "train" else analyse(job))
