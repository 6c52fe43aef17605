"""The study workflow on real cases: train, evaluate from MLflow (logged back), report."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT, run_segment, set_args, store_client, tiny_hippocampus_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory, hippocampus_root):
    """Two tiny models in one MLflow store: with skip dropout, and trained without skips."""
    folder = tmp_path_factory.mktemp("study")
    env = os.environ | {
        "SEGMENT_DATA_ROOT": str(hippocampus_root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }

    def segment(*args: str) -> subprocess.CompletedProcess:
        result = run_segment(*args, cwd=folder, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    overrides = set_args(tiny_hippocampus_overrides(epochs=1))
    segment("train", "--config", str(ROOT / "configs/hippocampus_3d.yaml"), "--quiet", *overrides)
    segment(
        "train",
        "--config",
        str(ROOT / "configs/hippocampus_3d_noskip.yaml"),
        "--quiet",
        *overrides,
        "--set",
        "model.long_skips=[0,0]",
    )
    task = str(hippocampus_root / "Task04_Hippocampus")
    ablation = segment(
        "evaluate",
        "--model",
        "models:/hippocampus_3d@best",
        "--data",
        task,
        "--split",
        "val",
        "--ablate-skips",
    )
    segment("evaluate", "--model", "models:/hippocampus_3d_noskip/latest", "--data", task, "--split", "val")
    return folder, env, segment, ablation


def test_evaluating_an_mlflow_model_logs_the_results_to_its_run(study):
    _, env, _, ablation = study
    client = store_client(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("hippocampus_3d", "best")
    assert f"Logged the evaluation to MLflow run {version.run_id}" in ablation.stdout
    run = client.get_run(version.run_id)
    assert "eval_val_mean_dice" in run.data.metrics
    assert {
        "eval_val_skip_mask_11_mean_dice",
        "eval_val_skip_mask_01_mean_dice",
        "eval_val_skip_mask_10_mean_dice",
        "eval_val_skip_mask_00_mean_dice",
    } <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert artifacts == {"evaluation/val.json", "evaluation/val.md", "evaluation/val_ablation.png"}
    with open(client.download_artifacts(version.run_id, "evaluation/val.json")) as handle:
        report = json.load(handle)
    assert report["cases"] == 2


def test_report_sets_switched_off_against_trained_without(study):
    folder, _, segment, _ = study
    result = segment("report", "--output", "study.md")
    text = (folder / "study.md").read_text()
    assert result.stdout.startswith("# Skip connection study")
    assert "| Task04_Hippocampus | hippocampus_3d | 3D | plain | 0.1 | 11 |" in text
    assert "| Task04_Hippocampus | hippocampus_3d_noskip | 3D | plain | 0 | 00 |" in text
    all_off = next(line for line in text.splitlines() if line.startswith("| 00 all off"))
    assert "(hippocampus_3d_noskip)" in all_off
    assert "off: level 1 (full resolution)" in text


def test_predict_accepts_an_mlflow_model_uri(study, hippocampus_root):
    folder, _, segment, _ = study
    image = sorted((hippocampus_root / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    segment(
        "predict", "--model", "models:/hippocampus_3d@best", "--input", str(image), "--output", "mask.nii.gz"
    )
    assert (folder / "mask.nii.gz").is_file()
