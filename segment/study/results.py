"""The study's results as the report needs them, gathered from MLflow: every finished study run
with its analysis (``study/cases.json``), its CPU time and its per-level gradient norms, and
the paired comparisons the report states."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from segment.study.analysis import has_analysis, read_analysis
from segment.study.runner import CPU_TAG, FINISHED
from segment.study.settings import NO_SKIP_DROPOUT, SETTINGS, WITH_SKIP_DROPOUT, Setting
from segment.study.statistics import (
    Difference,
    Interval,
    paired_difference,
    seed_interval,
)
from segment.tracking.store import store_errors, use_store


@dataclass
class AnalysedRun:
    run_id: str
    setting: str
    variant: str
    seed: int
    cpu_seconds: float
    analysis: dict
    gradient_norms: list[float]  # mean over the epochs, per encoder level, finest first

    def cases(self, mask: str | None = None) -> list[dict]:
        """The per-case measures under ``mask`` (default: the skips it was built with)."""
        return self.analysis["masks"][mask or self.analysis["built_skips"]]


@dataclass
class SettingResults:
    setting: Setting
    runs: dict[str, list[AnalysedRun]] = field(default_factory=lambda: defaultdict(list))  # by variant

    def seeds(self, variant: str) -> list[AnalysedRun]:
        return sorted(self.runs.get(variant, []), key=lambda run: run.seed)

    @property
    def base(self) -> list[AnalysedRun]:
        return self.seeds(WITH_SKIP_DROPOUT)

    @property
    def analysis(self) -> dict:
        """One analysis of the setting, for what every seed shares (labels, levels, bands)."""
        return next(iter(self.runs.values()))[0].analysis

    def masks(self) -> list[str]:
        return list(self.base[0].analysis["masks"]) if self.base else []


def _values(cases: list[dict], measure: str) -> np.ndarray:
    """One number per case: ``mean_dice``, ``cldice``, ``nsd:1`` (tolerance), or a vector
    measure (``error_distance``, ``band_energy``) as rows."""
    if measure.startswith("nsd:"):
        return np.array([case["nsd"][measure.removeprefix("nsd:")] for case in cases])
    return np.array([case[measure] for case in cases], dtype=float)


def interval(runs: list[AnalysedRun], measure: str, mask: str | None = None) -> Interval:
    """``measure``'s mean over cases per seed, then its interval over seeds (every score lies
    in [0, 1])."""
    return seed_interval([float(_values(run.cases(mask), measure).mean()) for run in runs], (0.0, 1.0))


def _same_seeds(
    a_runs: list[AnalysedRun], b_runs: list[AnalysedRun]
) -> list[tuple[AnalysedRun, AnalysedRun]]:
    """Each run of ``b_runs`` with the run of the same seed in ``a_runs``, where there is one."""
    by_seed = {run.seed: run for run in a_runs}
    return [(by_seed[run.seed], run) for run in b_runs if run.seed in by_seed]


def _paired(a_runs: list[AnalysedRun], b_runs: list[AnalysedRun], measure: str, a_mask, b_mask, column=None):
    rows = []
    for reference, run in _same_seeds(a_runs, b_runs):
        a, b = _values(reference.cases(a_mask), measure), _values(run.cases(b_mask), measure)
        if column is not None:
            a, b = a[:, column], b[:, column]
        rows.append(b - a)
    return np.array(rows)


def switched_off(
    results: SettingResults, mask: str, measure: str, column: int | None = None
) -> Difference | None:
    """The skip-dropout model with ``mask`` minus the same model with all its skips on."""
    base = results.base
    if not base:
        return None
    all_on = base[0].analysis["built_skips"]
    return paired_difference(_paired(base, base, measure, all_on, mask, column))


def _profile(pairs: list[tuple[list[dict], list[dict]]], measure: str, summarise) -> Interval | None:
    """A vector measure's (``error_distance``, ``band_energy``) change from each seed's
    reference cases to its changed cases: the mean over cases of the bands' increases (a band
    that lost errors counts zero), reduced to one number by ``summarise`` and given an interval
    over the seeds. ``summarise`` is a weighted mean over the bands, so its bounds are its
    values on a single band."""
    values = []
    for reference, changed in pairs:
        added = np.clip((_values(changed, measure) - _values(reference, measure)).mean(axis=0), 0, None)
        if added.sum() > 0:
            values.append(summarise(added))
    if not values:
        return None
    single_bands = [summarise(band) for band in np.eye(len(added))]
    return seed_interval(values, (min(single_bands), max(single_bands)))


def added_profile(results: SettingResults, mask: str, measure: str, summarise) -> Interval | None:
    """What switching ``mask``'s skips off adds to the skip-dropout model's errors, per band,
    reduced by ``summarise`` (see ``_profile``)."""
    base = results.base
    if not base:
        return None
    all_on = base[0].analysis["built_skips"]
    return _profile([(run.cases(all_on), run.cases(mask)) for run in base], measure, summarise)


def trained_without_profile(results: SettingResults, variant: str, measure: str, summarise) -> Interval | None:
    """What training as ``variant`` adds to the errors of the network with every skip and no
    skip dropout, seed by seed, reduced by ``summarise`` (see ``_profile``)."""
    pairs = _same_seeds(results.seeds(NO_SKIP_DROPOUT), results.seeds(variant))
    return _profile([(reference.cases(), run.cases()) for reference, run in pairs], measure, summarise)


def near_share(added: np.ndarray) -> float:
    """The share of the added wrong voxels on the boundary or one voxel from it."""
    return float(added[:2].sum() / added.sum())


def mean_band(added: np.ndarray) -> float:
    """The energy-weighted mean band of the added error, 1 the finest."""
    return float((np.arange(1, len(added) + 1) * added).sum() / added.sum())


def trained_without(
    results: SettingResults, variant: str, measure: str, column: int | None = None
) -> Difference | None:
    """A model trained as ``variant`` minus the same network trained with every skip and no
    skip dropout, seed by seed."""
    reference, other = results.seeds(NO_SKIP_DROPOUT), results.seeds(variant)
    differences = _paired(reference, other, measure, None, None, column)
    return paired_difference(differences) if len(differences) else None


def between_settings(a: SettingResults, b: SettingResults, variant: str, measure: str) -> Difference | None:
    """Setting ``b``'s ``variant`` minus setting ``a``'s, seed by seed and case by case (the
    cases they share, matched by name)."""
    rows = []
    for a_run, b_run in _same_seeds(a.seeds(variant), b.seeds(variant)):
        a_cases = {case["case"]: case for case in a_run.cases()}
        b_cases = {case["case"]: case for case in b_run.cases()}
        shared = sorted(a_cases.keys() & b_cases.keys())
        if shared:
            rows.append(
                _values([b_cases[name] for name in shared], measure)
                - _values([a_cases[name] for name in shared], measure)
            )
    if not rows or len({len(row) for row in rows}) > 1:
        return None
    return paired_difference(np.array(rows))


def collect(tracking_uri: str | None = None) -> list[SettingResults]:
    """Every setting with at least one analysed run, in the study's order."""
    import mlflow
    from mlflow import MlflowClient

    use_store(tracking_uri)
    client = MlflowClient()
    with store_errors("read the study's runs"):
        stored = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"attributes.status = '{FINISHED}' and tags.`study.setting` != ''",
            output_format="list",
        )
    by_setting = {setting.name: SettingResults(setting) for setting in SETTINGS}
    newest: dict[tuple, object] = {}
    for run in sorted(stored, key=lambda r: r.info.start_time):  # a rerun replaces the older one
        tags = run.data.tags
        newest[(tags["study.setting"], tags["study.variant"], int(tags["study.seed"]))] = run
    for (setting, variant, seed), run in newest.items():
        if setting not in by_setting:
            continue
        with store_errors(f"read run {run.info.run_id}"):
            if not has_analysis(run.info.run_id):
                continue
            analysis = read_analysis(run.info.run_id)
        levels = analysis["levels"]
        with store_errors(f"read the gradient norms of run {run.info.run_id}"):
            histories = [
                client.get_metric_history(run.info.run_id, f"grad_norm_level_{level}")
                for level in range(1, levels + 1)
            ]
        gradients = [
            float(np.mean([m.value for m in history])) if history else np.nan for history in histories
        ]
        by_setting[setting].runs[variant].append(
            AnalysedRun(
                run.info.run_id,
                setting,
                variant,
                seed,
                float(run.data.tags.get(CPU_TAG, 0)),
                analysis,
                gradients,
            )
        )
    return [results for results in by_setting.values() if results.runs]
