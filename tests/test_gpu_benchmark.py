"""benchmarks/gpu.py where no GPU is: its clean refusal, and each of its parts run on the CPU at
toy sizes, so the one call it gets on a GPU machine does not fail on a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_hippocampus_overrides

from segment.config import load_config

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
gpu = pytest.importorskip("gpu")


def tiny_config():
    """Five levels, as MONAI's BasicUNet has, but narrow, on a few cases."""
    overrides = [o for o in tiny_hippocampus_overrides(cases=8) if not o.startswith("model.levels")]
    return load_config(ROOT / "configs" / "hippocampus_3d.yaml", overrides)


def test_without_cuda_it_says_so_in_one_sentence_and_exits_0(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py"), "--json-out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == gpu.NO_CUDA
    assert not (tmp_path / "gpu.json").exists()


def test_it_runs_where_mlflow_simpleitk_and_streamlit_are_missing():
    """The GPU machine has none of them: the training path must not import them."""
    blocker = (
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mlflow', 'SimpleITK', 'streamlit'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import gpu\n"
        "sys.exit(gpu.main())\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == gpu.NO_CUDA


def test_step_times_compare_ours_with_basic_unet_in_every_variant():
    rows = gpu.step_times(tiny_config(), "cpu", repeats=1, shapes=(("toy", 1, (32, 32, 32)),))
    assert [(row["layout"], row["norm_kernel"]) for row in rows] == list(gpu.VARIANTS)
    for row in rows:
        assert row["ours_seconds"] > 0 and row["basic_unet_seconds"] > 0
        assert row["ours_vs_basic_unet"] == pytest.approx(row["ours_seconds"] / row["basic_unet_seconds"])


@pytest.mark.slow
def test_both_recipes_train_on_real_cases_and_report_dice_over_time(hippocampus_root: Path):
    config = tiny_config()
    ours = gpu.train_for(config, "cpu", hippocampus_root, minutes=0.05)
    recipe, network = gpu.monai_tutorial_recipe(config)
    reference = gpu.train_for(recipe, "cpu", hippocampus_root, minutes=0.05, network=network)
    for result in (ours, reference):
        assert result["epochs"] >= 1 and 0 <= result["best_mean_dice"] <= 1
        assert result["dice_history"] and set(result["seconds_to_dice"]) == {"0.87", "0.89"}
        assert result["loader_samples_per_second"] > 0 and result["train_samples_per_second"] > 0
    timings = gpu.inference_seconds(ours["_setup"], ours["_val_cases"], large=(96, 96, 40))
    assert timings["hippocampus_volume_seconds"] > 0 and timings["sliding_window_seconds"] > 0
