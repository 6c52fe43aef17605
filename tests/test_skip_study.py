"""The skip study: its fine-detail measures and statistics on arrays whose answers are known,
and the whole study (train, interrupt, resume, analyse, report) on a tiny real set-up."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import replace

import numpy as np
import pytest
from conftest import ROOT, segment_command, set_args, store_client, tiny_hippocampus_overrides
from scipy import ndimage

from segment.study import detail
from segment.study.analysis import case_measures
from segment.study.report import SettingReport, across_settings, gradient_summary, setting_comparisons
from segment.study.results import AnalysedRun, SettingResults
from segment.study.settings import (
    NO_SKIP_DROPOUT,
    SETTINGS,
    WITH_SKIP_DROPOUT,
    WITHOUT_LEVEL,
    WITHOUT_SKIPS,
    study_runs,
    variant_skips,
)
from segment.study.statistics import geometric_interval, paired_difference, seed_interval


def cube(size: int = 32, low: int = 8, high: int = 24) -> np.ndarray:
    truth = np.zeros((size,) * 3, dtype=np.int64)
    truth[low:high, low:high, low:high] = 1
    return truth


def test_errors_on_the_boundary_and_deep_inside_fall_in_their_distance_bands():
    truth = cube()
    distance = detail.boundary_distance(truth, (1.0, 1.0, 1.0))
    peeled = truth.copy()
    peeled[8, 8:24, 8:24] = 0  # the outermost layer of one face: on the boundary
    assert detail.error_distance_counts(peeled, truth, distance) == [256, 0, 0, 0, 0]
    holed = truth.copy()
    holed[15:17, 15:17, 15:17] = 0  # the centre, seven voxels from every face
    assert detail.error_distance_counts(holed, truth, distance) == [0, 0, 0, 0, 8]


def test_distances_count_in_the_finest_voxels_of_an_anisotropic_scan():
    truth = cube()
    distance = detail.boundary_distance(truth, (0.5, 0.5, 2.0))
    # Two voxels inside along the fine axis is 1 mm: two finest voxels.
    assert distance[9, 16, 16] == pytest.approx(1.0 / 0.5 - 1)
    assert distance[16, 16, 9] == pytest.approx(2.0 / 0.5)


def test_error_energy_splits_into_bands_that_add_up_to_the_wrong_voxels():
    truth = cube()
    scales = [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)]
    bands = detail.band_masks(truth.shape, scales)
    assert sum(band.sum() for band in bands) == truth.size
    assert not np.any(np.sum(bands, axis=0) > 1)  # a partition
    speckled = truth.copy()
    speckled[8:24:2, 8:24:2, 8:24:2] = 0  # every other voxel: detail at the finest scale
    block = truth.copy()
    block[8:24, 8:24, 8:16] = 0  # half the cube: a coarse error
    fine = detail.band_energies(speckled, truth, [1], bands)
    coarse = detail.band_energies(block, truth, [1], bands)
    assert sum(fine) == pytest.approx((speckled != truth).sum(), rel=1e-4)
    assert sum(coarse) == pytest.approx((block != truth).sum(), rel=1e-4)
    assert int(np.argmax(fine)) == 0
    assert int(np.argmax(coarse)) == len(bands) - 1


def test_a_broken_thin_line_loses_skeleton_recall_more_than_dice():
    truth = np.zeros((64, 64), dtype=np.int64)
    truth[10:54, 31:33] = 1  # a membrane two pixels wide
    broken = truth.copy()
    broken[30:34] = 0
    thick = truth.copy()
    thick[10:54, 30] = 1  # one pixel too wide: Dice drops, the skeleton survives
    cldice_broken, recall_broken = detail.skeleton_scores(broken, truth)
    cldice_thick, recall_thick = detail.skeleton_scores(thick, truth)
    assert recall_broken < 0.95 and recall_thick == 1.0
    assert cldice_broken < cldice_thick
    assert detail.skeleton_scores(truth, truth) == (1.0, 1.0)


def test_intervals_and_paired_differences():
    assert seed_interval([0.8, 0.8, 0.8]).low == pytest.approx(0.8)
    wide = seed_interval([0.70, 0.80, 0.90])
    assert wide.low < 0.7 and wide.high > 0.9  # three seeds: a t interval wider than the range
    dice = seed_interval([0.2, 0.9], (0.0, 1.0))  # two seeds far apart: cut where Dice ends
    assert (dice.low, dice.high) == (0.0, 1.0) and dice.mean == pytest.approx(0.55)
    norms = geometric_interval([0.001, 0.1, 0.01])  # decades apart: the log scale keeps it above zero
    assert norms.mean == pytest.approx(0.01) and 0 < norms.low < 0.001 and norms.high > 0.1
    generator = np.random.default_rng(0)
    shifted = paired_difference(generator.normal(0.02, 0.01, size=(3, 40)))
    assert shifted.real and shifted.low > 0 and shifted.p_value < 0.001
    noise = paired_difference(generator.normal(0.0, 0.01, size=(3, 40)))
    assert not noise.real and noise.low < 0 < noise.high
    assert not paired_difference(generator.normal(0.02, 0.01, size=(1, 40))).real  # one seed says nothing
    # Seeds that disagree: every case agrees within a seed, but three seeds at +0.01, +0.02 and
    # +0.03 cannot tell +0.02 from zero (their t interval is +-0.025), however many cases.
    by_seed = np.array([0.01, 0.02, 0.03])[:, None] + generator.normal(0.0, 0.001, size=(3, 40))
    seeds_apart = paired_difference(by_seed)
    assert not seeds_apart.real and seeds_apart.high - seeds_apart.mean > 0.024


def test_the_study_trains_pairs_together_and_the_claims_first():
    runs = study_runs(seeds=3, epochs=20)
    first_seed = [run.variant for run in runs[:3]]
    assert first_seed == [WITH_SKIP_DROPOUT, NO_SKIP_DROPOUT, WITHOUT_SKIPS]
    settings = [run.setting.name for run in runs]
    assert settings[:18] == ["hippocampus_3d"] * 9 + ["isbi2012_2d"] * 9
    assert [run.variant for run in runs[:54]].count(WITHOUT_SKIPS) == 18  # every setting's three
    assert [run.variant for run in runs[54:58]] == [f"without_level_{k}" for k in range(1, 5)]
    assert len({run.run_name for run in runs}) == len(runs)
    assert variant_skips("without_level_2", 5) == (1, 0, 1, 1)
    without = next(run for run in runs if run.variant == WITHOUT_SKIPS)
    assert "model.long_skips=[0,0,0,0]" in without.overrides()
    assert "trainer.max_minutes=null" in without.overrides()
    assert "trainer.amp=bf16" in without.overrides()


@pytest.mark.slow
def test_the_study_resumes_after_a_stop_and_reports_with_intervals(tmp_path, hippocampus_root):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    report = tmp_path / "report" / "report.md"
    command = segment_command(
        "study",
        "--setting",
        "hippocampus_3d",
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--data-root",
        str(hippocampus_root),
        "--output-dir",
        str(tmp_path / "study"),
        "--tracking-uri",
        store,
        "--report",
        str(report),
        # The study sets the epochs.
        *set_args([o for o in tiny_hippocampus_overrides(cases=8) if not o.startswith("trainer.max_epochs")]),
    )
    # One run at a time, stopped as soon as the first is trained: the second is mid-run.
    stopped = subprocess.Popen(
        [*command, "--jobs", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in stopped.stdout:
        if line.startswith("[1/"):
            break
    stopped.send_signal(signal.SIGTERM)
    _, errors = stopped.communicate(timeout=120)
    assert stopped.returncode == 130
    assert "run the same command again to resume" in errors
    client = store_client(store)
    before = {
        run.info.run_name: run.info.run_id
        for run in client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "attributes.status = 'FINISHED'"
        )
    }
    assert len(before) == 1
    progress = subprocess.run(
        [*command, "--progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert progress.stdout.startswith("1 of 10 study runs trained"), progress.stderr[-2000:]
    assert "CPU hours to go, at the finished runs' mean" in progress.stdout
    assert "  hippocampus_3d: 1 of 10" in progress.stdout

    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "1 of 10 study runs already trained" in finished.stdout
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.status = 'FINISHED'"
    )
    names = [run.info.run_name for run in runs]
    assert len(names) == len(set(names)) == 10  # nothing trained twice
    name, run_id = next(iter(before.items()))
    assert {run.info.run_name: run.info.run_id for run in runs}[name] == run_id
    for run in runs:
        assert float(run.data.tags["study.cpu_seconds"]) > 0
        assert "grad_norm_level_1" in run.data.metrics
        assert [a.path for a in client.list_artifacts(run.info.run_id, "study")] == ["study/cases.json"]

    text = report.read_text()
    assert "## hippocampus 3D, plain encoder, concatenated skips" in text
    assert "level 1 (full resolution) off, at inference" in text
    assert "trained without level 2 (1/2), against every skip" in text
    assert " [" in text  # two seeds: every figure has its interval
    for stem in ("levels", "boundary", "bands", "gradients"):
        assert (report.parent / "figures" / f"hippocampus_3d_{stem}.png").stat().st_size > 10_000

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "training:" not in again.stdout and "analysing:" not in again.stdout


def analysed_runs(truth: np.ndarray, setting: str, seeds: int = 2) -> list[AnalysedRun]:
    """Skip-dropout runs of a 3-level network whose predictions erode the truth a little more
    with each skip switched off, measured by the study's own per-case measures."""
    scales = [[1, 1], [2, 2], [4, 4]]
    bands = detail.band_masks(truth.shape, scales)
    distance = detail.boundary_distance(truth, [1.0] * truth.ndim)
    runs = []
    for seed in range(seeds):
        masks = {}
        for mask, eroded in (("11", 0), ("01", 1), ("10", 1), ("00", 2)):
            prediction = (
                ndimage.binary_erosion(truth, iterations=eroded).astype(np.int64) if eroded else truth
            )
            cases = [
                {
                    "case": f"case{number}",
                    **case_measures(prediction, truth, [1.0] * truth.ndim, 2, bands, distance),
                }
                for number in range(3)
            ]
            masks[mask] = cases
        analysis = {
            "labels": ["foreground"],
            "levels": 3,
            "level_scales": scales,
            "built_skips": "11",
            "distance_bands": list(detail.DISTANCE_BANDS),
            "nsd_tolerances": [f"{t:g}" for t in detail.NSD_TOLERANCES],
            "unit": "mm",
            "masks": masks,
        }
        runs.append(
            AnalysedRun(f"run{seed}", setting, WITH_SKIP_DROPOUT, seed, 1.0, analysis, [0.1, 0.05, 0.01])
        )
    return runs


@pytest.mark.parametrize(
    ("setting", "truth", "skeletons"),
    [("isbi2012_2d", np.pad(np.ones((24, 6), dtype=np.int64), 8), True), ("hippocampus_2d", cube(), False)],
)
def test_skeleton_scores_are_reported_for_2d_masks_not_for_volumes_a_2d_network_predicts(
    tmp_path, setting, truth, skeletons
):
    results = SettingResults(next(s for s in SETTINGS if s.name == setting))
    results.runs[WITH_SKIP_DROPOUT] = analysed_runs(truth, setting)
    text = "\n".join(SettingReport(results, tmp_path).markdown())
    assert ("clDice" in text) is skeletons
    assert "level 1 (full resolution) off, at inference" in text
    # Level 1's gradient over the deepest level's, per seed: 0.1 / 0.01 in every run.
    assert "| trained with skip dropout, every skip on |" in text and "| 10.0 [10.0, 10.0] |" in text
    assert (tmp_path / f"{setting}_levels.png").stat().st_size > 10_000


def test_a_network_trained_without_a_skip_has_its_added_errors_located_like_a_switched_off_skip(tmp_path):
    results = SettingResults(next(s for s in SETTINGS if s.name == "hippocampus_2d"))
    results.runs[WITH_SKIP_DROPOUT] = analysed_runs(cube(), "hippocampus_2d")
    # The same predictions read as separately trained networks: every skip (the truth itself),
    # and without level 1 (the cube eroded by one voxel).
    for variant, built in ((NO_SKIP_DROPOUT, "11"), (f"{WITHOUT_LEVEL}1", "01")):
        results.runs[variant] = [
            replace(run, variant=variant, analysis=run.analysis | {"built_skips": built})
            for run in results.runs[WITH_SKIP_DROPOUT]
        ]
    report = SettingReport(results, tmp_path)
    table, switched = report.boundary()
    row = next(line for line in table if line.startswith("| trained without level 1 (full resolution) |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[1].strip("*").split()[0]) > 0  # the eroded layer: on the boundary
    assert cells[-1] == "1.00 [1.00, 1.00]"
    assert list(switched) == ["level 1 (full resolution) off", "level 2 (1/2) off", "all off"]
    bands, _ = report.bands()
    assert any(line.startswith("| trained without level 1 (full resolution) |") for line in bands)


def test_the_gradient_summary_sets_each_seed_with_skips_against_the_same_seed_without():
    results = SettingResults(SETTINGS[0])
    for seed, scale in enumerate((1.0, 1.1, 0.9)):
        for variant, norms in ((NO_SKIP_DROPOUT, [0.10, 0.02, 0.001]), (WITHOUT_SKIPS, [0.03, 0.02, 0.01])):
            gradients = [norm * scale for norm in norms]
            results.runs[variant].append(
                AnalysedRun(f"{variant}{seed}", "s", variant, seed, 1.0, {}, gradients)
            )
    row = next(line for line in gradient_summary([results]) if line.startswith(f"| {SETTINGS[0].title}"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "3"
    assert cells[4] == "**3.33 [3.33, 3.33]**"  # the same ratio for every seed: certain, above 1
    assert cells[5].startswith("100.0") and cells[6].startswith("3.0")
    assert gradient_summary([SettingResults(SETTINGS[1])]) == []  # no pairs, no section


def test_the_settings_are_set_side_by_side_level_by_level(tmp_path):
    volumes = SettingResults(next(s for s in SETTINGS if s.name == "hippocampus_2d"))
    volumes.runs[WITH_SKIP_DROPOUT] = analysed_runs(cube(), "hippocampus_2d")
    untrained = SettingResults(SETTINGS[0])  # no analysed run yet: left out
    text = "\n".join(across_settings([volumes, untrained], tmp_path))
    assert "| setting | level 1 off | level 2 off |" in text
    assert SETTINGS[0].title not in text
    # An eroded cube loses voxels on its boundary only: every added error is within 1 voxel.
    assert f"| {volumes.setting.title} | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] |" in text
    assert (tmp_path / "across_settings.png").stat().st_size > 10_000
    assert across_settings([untrained], tmp_path) == []


def test_two_settings_are_set_against_each_other_case_by_case_with_the_seeds_interval():
    def reference_runs(setting: str, dice_by_case: dict[str, float], shift_per_seed: list[float]):
        runs = []
        for seed, shift in enumerate(shift_per_seed):
            # Surface Dice moves by a tenth as much from seed to seed.
            near = 0.02 + (shift - 0.02) / 10 if shift else 0.0
            cases = [
                {"case": name, "mean_dice": dice + shift, "nsd": {"0.5": dice + near}}
                for name, dice in dice_by_case.items()
            ]
            analysis = {"built_skips": "11", "masks": {"11": cases}}
            runs.append(AnalysedRun(f"{setting}{seed}", setting, NO_SKIP_DROPOUT, seed, 1.0, analysis, []))
        return runs

    concatenated, added = (
        SettingResults(next(s for s in SETTINGS if s.name == name)) for name in ("hippocampus_3d", "hippocampus_3d_add")
    )
    concatenated.runs[NO_SKIP_DROPOUT] = reference_runs("c", {"a": 0.8, "b": 0.9}, [0.0, 0.0, 0.0])
    # The added-skip runs list their cases in another order; each seed is 0.01, 0.02, 0.03 better.
    added.runs[NO_SKIP_DROPOUT] = reference_runs("a", {"b": 0.9, "a": 0.8}, [0.01, 0.02, 0.03])
    (row,) = [line for line in setting_comparisons([concatenated, added]) if line.startswith("| added")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "added skips against concatenated skips (hippocampus 3D, plain encoder)"
    # Mean +0.02; the t interval over the seeds' 0.01, 0.02, 0.03 is +-4.303 * 0.01 / sqrt(3)
    # and holds zero, over 0.019, 0.02, 0.021 it does not.
    assert cells[1] == "+0.0200 [-0.0048, +0.0448]"
    assert cells[2] == "**+0.0200 [+0.0175, +0.0225]**"
    assert cells[4] == "-"  # no runs trained without long skips: no figure
    assert setting_comparisons([concatenated]) == []
