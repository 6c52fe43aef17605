"""The skip study's runs. Each setting (a network on a task) is trained with skip dropout, so
that its skips can be switched off at inference, and as references trained without them: the
same network without skip dropout, without any long skip and, where asked, without each long
skip in turn. Every one of these with each seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from segment.errors import InputError

WITH_SKIP_DROPOUT = "skip_dropout"
NO_SKIP_DROPOUT = "no_skip_dropout"
WITHOUT_SKIPS = "without_skips"
WITHOUT_LEVEL = "without_level_"  # followed by the level, from 1 (finest)


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    config: str  # a file under the configs folder
    overrides: tuple[str, ...] = ()
    per_level_references: bool = False  # train one model without each long skip

    def levels(self, configs: Path, extra: Sequence[str] = ()) -> int:
        from segment.config import load_config

        return load_config(configs / self.config, [*self.overrides, *extra]).model.levels

    def variants(self) -> list[str]:
        return [WITH_SKIP_DROPOUT, NO_SKIP_DROPOUT, WITHOUT_SKIPS]

    def per_level_variants(self, levels: int) -> list[str]:
        if not self.per_level_references:
            return []
        return [f"{WITHOUT_LEVEL}{level}" for level in range(1, levels)]


# In the order they are trained, the per-level references last: a study stopped early holds
# every setting's skip-dropout model and its two references first.
SETTINGS = (
    Setting(
        "hippocampus_3d",
        "hippocampus 3D, plain encoder, concatenated skips",
        "hippocampus_3d.yaml",
        per_level_references=True,
    ),
    Setting("isbi2012_2d", "EM membranes 2D, plain encoder, concatenated skips", "isbi2012_2d.yaml"),
    Setting(
        "hippocampus_3d_resnet",
        "hippocampus 3D, ResNet encoder, concatenated skips",
        "hippocampus_3d_resnet.yaml",
    ),
    Setting("hippocampus_2d", "hippocampus 2D, plain encoder, concatenated skips", "hippocampus_2d.yaml"),
    Setting(
        "hippocampus_3d_add",
        "hippocampus 3D, plain encoder, added skips",
        "hippocampus_3d.yaml",
        ("model.skip_mode=add",),
    ),
    Setting(
        "hippocampus_3d_resnet_add",
        "hippocampus 3D, ResNet encoder, added skips",
        "hippocampus_3d_resnet.yaml",
        ("model.skip_mode=add",),
    ),
)

# Settings set against each other in the report, (A, B) for "B against A": the same task's
# cases and seeds, so that each difference is paired.
COMPARISONS = (
    ("hippocampus_3d", "hippocampus_3d_add"),
    ("hippocampus_3d_resnet", "hippocampus_3d_resnet_add"),
    ("hippocampus_3d", "hippocampus_3d_resnet"),
    ("hippocampus_3d", "hippocampus_2d"),
)


def variant_skips(variant: str, levels: int) -> tuple[int, ...]:
    """The long skips a variant is built with, finest first."""
    if variant == WITHOUT_SKIPS:
        return (0,) * (levels - 1)
    if variant.startswith(WITHOUT_LEVEL):
        off = int(variant.removeprefix(WITHOUT_LEVEL))
        return tuple(int(level != off) for level in range(1, levels))
    return (1,) * (levels - 1)


@dataclass(frozen=True)
class StudyRun:
    setting: Setting
    variant: str
    seed: int
    epochs: int
    levels: int
    extra: tuple[str, ...] = ()  # overrides given to the whole study, e.g. data.max_cases=8

    @property
    def run_name(self) -> str:
        """The MLflow run name, by which a finished or interrupted run is found again."""
        return " ".join(["study", self.setting.name, self.variant, "seed", str(self.seed), *self.extra])

    @property
    def model_name(self) -> str:
        """The registered model: one per setting and variant, a version per seed."""
        return f"study_{self.setting.name}_{self.variant}"

    @property
    def tags(self) -> dict[str, str]:
        return {
            "study.setting": self.setting.name,
            "study.variant": self.variant,
            "study.seed": str(self.seed),
            "study.epochs": str(self.epochs),
        }

    def overrides(self) -> list[str]:
        fixed = [
            f"name={self.model_name}",
            f"trainer.seed={self.seed}",
            f"trainer.max_epochs={self.epochs}",
            # Epochs decide, not minutes: a budget in minutes would give a loaded machine's
            # seeds fewer epochs than an idle one's.
            "trainer.max_minutes=null",
            # One precision on every machine: "auto" picks bf16 on a CPU with native bf16 and
            # fp32 on one without, and a setting's seeds may be trained on different machines.
            "trainer.amp=bf16",
            *self.setting.overrides,
            *self.extra,
        ]
        if self.variant == WITH_SKIP_DROPOUT:
            return fixed
        skips = ",".join(map(str, variant_skips(self.variant, self.levels)))
        return [*fixed, "model.skip_dropout=0", f"model.long_skips=[{skips}]"]

    def config_path(self, configs: Path) -> Path:
        return configs / self.setting.config


def study_runs(
    seeds: int,
    epochs: int,
    only: Sequence[str] | None = None,
    configs: Path = Path("configs"),
    extra: Sequence[str] = (),
) -> list[StudyRun]:
    """Every run of the study, in training order: setting by setting, seed by seed, so that a
    seed's variants finish together and can be paired. ``extra`` overrides apply to every run."""
    names = [setting.name for setting in SETTINGS]
    unknown = [name for name in only or [] if name not in names]
    if unknown:
        raise InputError(f"There is no study setting {unknown[0]!r}; choose from {', '.join(names)}.")
    chosen = [s for s in SETTINGS if not only or s.name in only]
    levels = {setting.name: setting.levels(configs, extra) for setting in chosen}
    groups = [(setting, setting.variants()) for setting in chosen]
    groups += [(setting, setting.per_level_variants(levels[setting.name])) for setting in chosen]
    return [
        StudyRun(setting, variant, seed, epochs, levels[setting.name], tuple(extra))
        for setting, variants in groups
        for seed in range(seeds)
        for variant in variants
    ]
