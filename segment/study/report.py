"""The study report: Markdown tables with 95 % intervals and the figures, from
:func:`segment.study.results.collect`. Every difference carries its interval and p-value, and
is called real only when the interval excludes zero."""

from __future__ import annotations

from pathlib import Path

from segment import plots
from segment.atomic import write_atomically
from segment.study import figures
from segment.study.results import (
    AnalysedRun,
    SettingResults,
    added_profile,
    between_settings,
    interval,
    mean_band,
    near_share,
    switched_off,
    trained_without,
    trained_without_profile,
)
from segment.study.settings import (
    COMPARISONS,
    NO_SKIP_DROPOUT,
    WITH_SKIP_DROPOUT,
    WITHOUT_LEVEL,
    WITHOUT_SKIPS,
)
from segment.study.statistics import Difference, Interval, geometric_interval

FIGURES = "figures"


def _scale(scales: list[int]) -> str:
    return "full resolution" if max(scales) == 1 else "1/" + "x".join(dict.fromkeys(map(str, scales)))


def mask_name(mask: str, analysis: dict) -> str:
    """``0111`` -> ``level 1 (full resolution) off``; all off -> ``all off``."""
    off = [level for level, flag in enumerate(mask, start=1) if flag == "0"]
    built_off = [level for level, flag in enumerate(analysis["built_skips"], start=1) if flag == "0"]
    off = [level for level in off if level not in built_off]
    if not off:
        return "all on"
    if len(off) + len(built_off) == len(mask):
        return "all off"
    return (
        ", ".join(f"level {level} ({_scale(analysis['level_scales'][level - 1])})" for level in off) + " off"
    )


def variant_name(variant: str, analysis: dict) -> str:
    if variant == WITH_SKIP_DROPOUT:
        return "trained with skip dropout, every skip on"
    if variant == NO_SKIP_DROPOUT:
        return "every skip, no skip dropout"
    if variant == WITHOUT_SKIPS:
        return "trained without any long skip"
    level = int(variant.removeprefix(WITHOUT_LEVEL))
    return f"trained without level {level} ({_scale(analysis['level_scales'][level - 1])})"


def band_names(analysis: dict) -> list[str]:
    """Frequency band k, matched to level k: the wavelengths level k can hold and level k+1
    cannot, in voxels."""
    scales = [max(s) for s in analysis["level_scales"]]
    names = [f"{2 * scales[k]}-{2 * scales[k + 1]} vox" for k in range(len(scales) - 1)]
    return [*names, f"{2 * scales[-1]}+ vox"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _difference_cell(difference: Difference | None, digits: int = 4) -> str:
    if difference is None:
        return "-"
    text = difference.text(digits)
    return f"**{text}**" if difference.real else text


def _p(difference: Difference | None) -> str:
    return "-" if difference is None else f"{difference.p_value:.2g}"


def _saved(figure, figures_dir: Path, stem: str, alt: str) -> str:
    """Write ``figure`` as ``stem``.png in ``figures_dir``; its Markdown image line."""
    with plots.released(figure):
        figure.savefig(figures_dir / f"{stem}.png", dpi=110)
    return f"![{alt}]({FIGURES}/{stem}.png)"


class SettingReport:
    """The tables and figures of one setting."""

    def __init__(self, results: SettingResults, figures_dir: Path) -> None:
        self.results, self.figures_dir = results, figures_dir
        self.analysis = results.analysis
        # Skeleton scores are taken on 2D masks only: the EM slices, not the volumes a 2D
        # network predicts slice by slice.
        first_cases = next(iter(self.analysis["masks"].values()))
        self.skeletons = bool(first_cases) and "cldice" in first_cases[0]
        self.measures = [
            "mean_dice",
            "nsd:0.5",
            "nsd:1",
            "nsd:2",
            *(["cldice", "skeleton_recall"] if self.skeletons else []),
        ]
        self.headers = [
            "Dice",
            "NSD 0.5",
            "NSD 1",
            "NSD 2",
            *(["clDice", "skeleton recall"] if self.skeletons else []),
        ]

    @property
    def name(self) -> str:
        return self.results.setting.name

    def off_masks(self) -> list[str]:
        masks = self.results.masks()
        return masks[1:]

    def level_variants(self) -> list[str]:
        return [v for v in self.results.runs if v.startswith(WITHOUT_LEVEL)] + (
            [WITHOUT_SKIPS] if WITHOUT_SKIPS in self.results.runs else []
        )

    def scores(self) -> list[str]:
        rows = []
        base = self.results.base
        for mask in self.results.masks():
            what = "skip dropout" + (
                "" if mask == self.results.masks()[0] else f", {mask_name(mask, self.analysis)} at inference"
            )
            rows.append(
                [what, mask, str(len(base)), *(interval(base, m, mask).text() for m in self.measures)]
            )
        for variant in [NO_SKIP_DROPOUT, *self.level_variants()]:
            runs = self.results.seeds(variant)
            if runs:
                rows.append(
                    [
                        variant_name(variant, self.analysis),
                        runs[0].analysis["built_skips"],
                        str(len(runs)),
                        *(interval(runs, m).text() for m in self.measures),
                    ]
                )
        return _table(["model", "skips", "seeds", *self.headers], rows)

    def differences(self) -> list[str]:
        shown = ["mean_dice", "nsd:0.5", "nsd:1", *(["cldice"] if self.skeletons else [])]
        header = [
            "change",
            *(
                f"{h} [95 % interval]"
                for h in ("Dice", "NSD 0.5", "NSD 1", *(["clDice"] if self.skeletons else []))
            ),
            "p (Dice)",
        ]
        rows = []
        for mask in self.off_masks():
            found = [switched_off(self.results, mask, m) for m in shown]
            rows.append(
                [
                    f"{mask_name(mask, self.analysis)}, at inference",
                    *map(_difference_cell, found),
                    _p(found[0]),
                ]
            )
        # Skip dropout's own price first: the same network, every skip on, trained both ways.
        for variant in [WITH_SKIP_DROPOUT, *self.level_variants()]:
            found = [trained_without(self.results, variant, m) for m in shown]
            if found[0] is not None:
                rows.append(
                    [
                        f"{variant_name(variant, self.analysis)}, against every skip without skip dropout",
                        *map(_difference_cell, found),
                        _p(found[0]),
                    ]
                )
        return _table(header, rows)

    def _banded(self, measure: str, names: list[str]) -> dict[str, list[Difference]]:
        return {
            mask_name(mask, self.analysis): [
                switched_off(self.results, mask, measure, column) for column in range(len(names))
            ]
            for mask in self.off_masks()
        }

    def _banded_table(
        self, measure: str, columns: list[str], summary: str, summarise
    ) -> tuple[list[str], dict[str, list[Difference]]]:
        """Each level switched off, then each network trained without skips: its change per
        band (distance or frequency) with intervals, then ``summarise`` of the bands that grew,
        per seed. The rows switched off are returned for the figures."""
        def line(name: str, differences: list[Difference], reduced: Interval | None) -> list[str]:
            return [name, *(_difference_cell(d, 1) for d in differences), reduced.text(2) if reduced else "-"]

        rows = self._banded(measure, columns)
        lines = [
            line(name, differences, added_profile(self.results, mask, measure, summarise))
            for mask, (name, differences) in zip(self.off_masks(), rows.items(), strict=True)
        ]
        for variant in self.level_variants():
            differences = [
                trained_without(self.results, variant, measure, column) for column in range(len(columns))
            ]
            if differences[0] is not None:
                reduced = trained_without_profile(self.results, variant, measure, summarise)
                lines.append(line(variant_name(variant, self.analysis), differences, reduced))
        return _table(["change", *columns, summary], lines), rows

    def boundary(self) -> tuple[list[str], dict[str, list[Difference]]]:
        columns = [f"{n} vox" for n in self.analysis["distance_bands"]]
        return self._banded_table("error_distance", columns, "added within 1 voxel", near_share)

    def bands(self) -> tuple[list[str], dict[str, list[Difference]]]:
        columns = [f"band {k + 1}: {n}" for k, n in enumerate(band_names(self.analysis))]
        return self._banded_table("band_energy", columns, "mean band of the added error", mean_band)

    def gradients(self) -> tuple[list[str], dict]:
        curves = {}
        rows = []
        for variant in (WITH_SKIP_DROPOUT, NO_SKIP_DROPOUT, WITHOUT_SKIPS):
            runs = self.results.seeds(variant)
            if runs:
                levels = len(runs[0].gradient_norms)
                name = variant_name(variant, self.analysis)
                curves[name] = [
                    geometric_interval([run.gradient_norms[level] for run in runs]) for level in range(levels)
                ]
                ratio = geometric_interval([finest_over_deepest(run) for run in runs])
                rows.append([name, *(i.text(4) for i in curves[name]), ratio.text(1)])
        levels = len(next(iter(curves.values()), []))
        header = ["trained", *(f"level {k}" for k in range(1, levels + 1)), "level 1 / deepest"]
        return _table(header, rows), curves

    def single_levels(self) -> list[str]:
        """The masks with one level's skip off: the figures leave out all off, whose change
        would dwarf theirs (the tables hold it)."""
        return [mask for mask in self.off_masks() if mask_name(mask, self.analysis) != "all off"]

    def _level_figure(self):
        """Each level switched off at inference beside the network trained without it."""
        masks = self.single_levels()
        names = [mask_name(mask, self.analysis) for mask in masks]
        measures = {}
        for measure, title in (
            ("mean_dice", "Dice"),
            ("nsd:1", "NSD 1"),
            *((("cldice", "clDice"),) if self.skeletons else ()),
        ):
            switched = [switched_off(self.results, mask, measure) for mask in masks]
            trained = [
                trained_without(self.results, f"{WITHOUT_LEVEL}{mask.index('0') + 1}", measure)
                for mask in masks
            ]
            measures[title] = (switched, trained)
        return figures.level_changes(self.results.setting.title, names, measures)

    def _single(self, rows: dict) -> dict:
        return {name: row for name, row in rows.items() if name != "all off"}

    def _figure(self, figure, stem: str) -> str:
        return _saved(figure, self.figures_dir, f"{self.name}_{stem}", f"{self.name} {stem}")

    def markdown(self) -> list[str]:
        setting, results = self.results.setting, self.results
        cases = (
            len(results.base[0].cases())
            if results.base
            else len(next(iter(results.runs.values()))[0].cases())
        )
        lines = [
            f"## {setting.title}",
            "",
            f"{cases} validation cases; seeds per model in the table.",
            "",
            *self.scores(),
            "",
        ]
        lines += ["### Changes, paired by case and seed", "", *self.differences(), ""]
        if results.base:
            lines += [self._figure(self._level_figure(), "levels"), ""]
            table, rows = self.boundary()
            lines += [
                "### Where the lost voxels are",
                "",
                "Extra wrong voxels per case, by distance to the true boundary: a skip switched off against all skips on in the skip-dropout model, a network trained without skips against the one with every skip. The last column: of the voxels added in the bands whose errors grew, the share on the boundary or one voxel from it (per seed, then its interval).",
                "",
                *table,
                "",
            ]
            lines += [
                self._figure(
                    figures.banded(
                        "Extra errors by distance to the boundary",
                        self._single(rows),
                        [f"{n} vox" for n in self.analysis["distance_bands"]],
                        "distance to the true boundary",
                        "extra wrong voxels per case",
                    ),
                    "boundary",
                ),
                "",
            ]
            table, rows = self.bands()
            lines += [
                "### At which scale",
                "",
                "Extra error energy per case in each frequency band (band k: the wavelengths level k can hold and level k+1 cannot), against the same references. The last column: the energy-weighted mean band of the added error (1 = finest; per seed, then its interval).",
                "",
                *table,
                "",
            ]
            lines += [
                self._figure(
                    figures.banded(
                        "Extra error energy by frequency band",
                        self._single(rows),
                        band_names(self.analysis),
                        "band (wavelength)",
                        "extra error energy per case",
                    ),
                    "bands",
                ),
                "",
            ]
        table, curves = self.gradients()
        if curves:
            lines += [
                "### Gradient flow",
                "",
                "Gradient norm reaching each encoder level's weights, each run's mean over training; the geometric mean over seeds, with the 95 % interval of the logarithms:",
                "",
                *table,
                "",
            ]
            lines += [self._figure(figures.gradient_flow(setting.title, curves), "gradients"), ""]
        return lines


def _ratio_cell(ratio: Interval) -> str:
    text = ratio.text(2)
    return f"**{text}**" if ratio.seeds >= 2 and (ratio.low > 1 or ratio.high < 1) else text


def finest(run: AnalysedRun) -> float:
    return run.gradient_norms[0]


def finest_over_deepest(run: AnalysedRun) -> float:
    return run.gradient_norms[0] / run.gradient_norms[-1]


def gradient_summary(all_results: list[SettingResults]) -> list[str]:
    """The gradient reaching the finest encoder level with every long skip and without any,
    setting beside setting, so that the plain and ResNet (short-skip) encoders can be set side
    by side. Ratios are per seed (the same seed with and without), then their interval."""
    rows = []
    for results in all_results:
        with_skips = {run.seed: run for run in results.seeds(NO_SKIP_DROPOUT)}
        pairs = [
            (with_skips[run.seed], run)
            for run in results.seeds(WITHOUT_SKIPS)
            if run.seed in with_skips and run.gradient_norms and with_skips[run.seed].gradient_norms
        ]
        if not pairs:
            continue
        rows.append(
            [
                results.setting.title,
                str(len(pairs)),
                geometric_interval([finest(a) for a, _ in pairs]).text(4),
                geometric_interval([finest(b) for _, b in pairs]).text(4),
                _ratio_cell(geometric_interval([finest(a) / finest(b) for a, b in pairs])),
                geometric_interval([finest_over_deepest(a) for a, _ in pairs]).text(1),
                geometric_interval([finest_over_deepest(b) for _, b in pairs]).text(1),
            ]
        )
    if not rows:
        return []
    header = [
        "setting",
        "seeds",
        "level 1, with long skips",
        "level 1, without",
        "with / without",
        "level 1 / deepest, with",
        "level 1 / deepest, without",
    ]
    return [
        "## Gradient flow, setting beside setting",
        "",
        "Gradient norm reaching the finest encoder level's weights (each run's mean over training), in the network with every long skip (no skip dropout) and in the one trained without any; ratios per seed. Geometric means over seeds, with the 95 % interval of the logarithms. **Bold**: the ratio's interval excludes 1. The ResNet encoder's short skips are in both of its networks.",
        "",
        *_table(header, rows),
        "",
    ]


def across_settings(all_results: list[SettingResults], figures_dir: Path) -> list[str]:
    """Every setting's single skips side by side: the Dice each costs when switched off, and the
    share of the voxels it loses that lie on the true boundary or one voxel from it."""
    rows, dice_rows, share_rows = {}, [], []
    for results in all_results:
        if not results.base:
            continue
        masks = SettingReport(results, figures_dir).single_levels()
        dice = [switched_off(results, mask, "mean_dice") for mask in masks]
        share = [added_profile(results, mask, "error_distance", near_share) for mask in masks]
        rows[results.setting.title] = (dice, share)
        dice_rows.append([results.setting.title, *(_difference_cell(d) for d in dice)])
        share_rows.append([results.setting.title, *("-" if i is None else i.text(2) for i in share)])
    if not rows:
        return []
    levels = max(len(dice) for dice, _ in rows.values())
    header = ["setting", *(f"level {k} off" for k in range(1, levels + 1))]

    def padded(table_rows: list[list[str]]) -> list[list[str]]:
        return [row + ["-"] * (levels + 1 - len(row)) for row in table_rows]

    figure = _saved(figures.across_settings(rows), figures_dir, "across_settings", "across settings")
    return [
        "## Across settings",
        "",
        "Each long skip switched off alone, at inference, in every setting's skip-dropout model. "
        "The change in Dice (paired by case and seed; **bold**: the interval excludes zero):",
        "",
        *_table(header, padded(dice_rows)),
        "",
        "Of the voxels it adds to the errors, the share on the true boundary or one voxel from it "
        "(per seed, then its interval; - where it adds none):",
        "",
        *_table(header, padded(share_rows)),
        "",
        figure,
        "",
    ]


def comparison_name(a: SettingResults, b: SettingResults) -> str:
    """"added skips against concatenated skips (hippocampus 3D, plain encoder)": what differs
    between two settings' titles, then what they share."""
    pairs = list(zip(a.setting.title.split(", "), b.setting.title.split(", "), strict=True))
    old, new = (" and ".join(part[side] for part in pairs if part[0] != part[1]) for side in (0, 1))
    return f"{new} against {old} ({', '.join(x for x, y in pairs if x == y)})"


def setting_comparisons(all_results: list[SettingResults]) -> list[str]:
    """Settings set against each other (:data:`COMPARISONS`): the same variant, seed and case
    in both, so that concatenated against added skips, or one encoder against the other, is a
    paired difference."""
    by_name = {results.setting.name: results for results in all_results}
    columns = (
        (NO_SKIP_DROPOUT, "mean_dice", "every skip: Dice"),
        (NO_SKIP_DROPOUT, "nsd:0.5", "every skip: NSD 0.5"),
        (WITH_SKIP_DROPOUT, "mean_dice", "skip dropout: Dice"),
        (WITHOUT_SKIPS, "mean_dice", "without long skips: Dice"),
    )
    rows = []
    for a_name, b_name in COMPARISONS:
        if a_name not in by_name or b_name not in by_name:
            continue
        a, b = by_name[a_name], by_name[b_name]
        cells = [between_settings(a, b, variant, measure) for variant, measure, _ in columns]
        if any(cells):
            rows.append([comparison_name(a, b), *(_difference_cell(cell) for cell in cells)])
    if not rows:
        return []
    return [
        "## Settings against each other",
        "",
        "The second setting minus the first, for the same variant (skip dropout: every skip on), "
        "paired by seed and case. **Bold**: the interval excludes zero.",
        "",
        *_table(["change", *(title for _, _, title in columns)], rows),
        "",
    ]


def study_report(all_results: list[SettingResults], output: Path) -> str:
    """Write the report to ``output`` (Markdown) and its figures beside it; return the text."""
    figures_dir = output.parent / FIGURES
    figures_dir.mkdir(parents=True, exist_ok=True)
    cpu = sum(run.cpu_seconds for results in all_results for runs in results.runs.values() for run in runs)
    lines = [
        "# The skip study: results",
        "",
        "Generated by `segment report` from the study's MLflow runs. Figures are the mean over "
        "seeds with a 95 % interval: a t interval over seeds for scores; for paired changes, a t "
        "interval whose variance is the seeds' plus the cases' (Welch-Satterthwaite degrees of "
        "freedom), so that it holds for another seed and other cases. **Bold**: the interval "
        "excludes zero. p: Wilcoxon signed-rank test over cases of the seed-averaged change; it "
        "sees the case noise only, so a small p with an interval holding zero is a change that "
        "the seeds do not agree on. NSD t: surface Dice within t voxels (millimetres on the "
        "hippocampus).",
        "",
        f"Training CPU time of the analysed runs: {cpu / 3600:.1f} hours.",
        "",
    ]
    lines += across_settings(all_results, figures_dir)
    lines += setting_comparisons(all_results)
    lines += gradient_summary(all_results)
    for results in all_results:
        lines += SettingReport(results, figures_dir).markdown()
    text = "\n".join(lines) + "\n"
    write_atomically(output, lambda temporary: temporary.write_text(text))
    return text
