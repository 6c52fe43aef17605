"""Experiment configs: the shipped ones load, overrides apply, mistakes get one clear sentence."""

from pathlib import Path

import pytest

from segment.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "hippocampus_3d.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.name == path.stem


def test_overrides_are_parsed_as_yaml_values():
    config = load_config(DEFAULT, ["model.skip_dropout=[0.1, 0.2, 0.3, 0.4]", "model.encoder=resnet"])
    assert config.model.skip_dropout_per_level == (0.1, 0.2, 0.3, 0.4)
    assert config.model.encoder == "resnet"


def test_mixed_precision_can_be_switched_off_with_a_bare_yaml_off():
    assert load_config(DEFAULT, ["trainer.amp=off"]).trainer.amp == "off"


def test_channels_default_to_base_channels_doubled_per_level():
    config = load_config(DEFAULT, ["model.levels=4", "model.base_channels=8"])
    assert config.model.widths == (8, 16, 32, 64)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.encoder=vgg", r"model\.encoder: Input should be 'plain' or 'resnet' \(got 'vgg'\)"),
        ("model.channels=[8,16,32]", "channels lists 3 widths but levels is 5"),
        ("model.chanels=[8,16]", "unknown key 'model.chanels'"),
        ("trainer_typo.lr=1", "unknown key 'trainer_typo'"),
        ("model.skip_dropout=[0.1,0.2]", "skip_dropout has 2 entries but the model has 4 long skips"),
        ("model.skip_dropout=1.5", r"skip_dropout values must be in \[0, 1\)"),
        ("model.blocks_per_level=[1,2,2]", "blocks_per_level applies only to the resnet encoder"),
        ("model.levels=1", "model.levels: Input should be greater than or equal to 2"),
        ("model", "expected key=value"),
        ("model.long_skips=[1,0]", "long_skips has 2 entries but the model has 4 long skips"),
        ("model.deep_supervision=4", "deep_supervision can supervise at most 3 coarser levels"),
        ("data.patch_size=[64,64]", "data.patch_size has 2 sizes but the model is 3D"),
        ("data.flip_axes=[3]", "data.flip_axes must name spatial axes 0..2"),
        ("data.scale_range=[1.2,0.8]", r"data: scale_range must be two factors with 0 < low <= high"),
        ("data.intensity_augment=heavy", r"data\.intensity_augment: Input should be 'basic' or 'nnunet'"),
        ("data.fold=1", "fold is set but folds is not; give data.folds too"),
        ("data.folds=1", "data.folds: Input should be greater than or equal to 2"),
    ],
)
def test_bad_config_fails_with_one_sentence_naming_the_problem(override, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(DEFAULT, [override])
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(".")


def test_a_fold_beyond_the_folds_is_refused_naming_the_range():
    with pytest.raises(ConfigError, match=r"fold must be one of 0\.\.4 with 5 folds, got 5"):
        load_config(DEFAULT, ["data.folds=5", "data.fold=5"])


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    binary = tmp_path / "scan.nii.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"scan\.nii\.gz is not a text file; a config is YAML\.$"):
        load_config(binary)


def test_a_config_extends_another_keeping_its_own_name_and_merging_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: base\nmodel: {out_channels: 3, levels: 4, skip_dropout: 0.1}\ntrainer: {lr: 0.003, seed: 4}\n"
    )
    (tmp_path / "nested").mkdir()
    variant = tmp_path / "nested" / "variant.yaml"
    variant.write_text("extends: ../base.yaml\nmodel: {levels: 3, skip_dropout: [0.0, 0.2]}\ntrainer: {lr: 0.001}\n")
    config = load_config(variant, ["trainer.seed=7"])
    assert config.name == "variant"
    assert (config.model.out_channels, config.model.levels) == (3, 3)
    assert config.model.skip_dropout_per_level == (0.0, 0.2)
    assert (config.trainer.lr, config.trainer.seed) == (0.001, 7)


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        ("hippocampus_3d_10min", ["trainer.max_minutes=10"]),
        ("hippocampus_3d_wide", ["trainer.max_minutes=60", "trainer.seed=1", "model.channels=[12,24,48,96,192]"]),
    ],
)
def test_each_cpu_recipe_is_the_default_with_the_readme_overrides(recipe, overrides):
    shared = ["trainer.batch_size=2", "trainer.lr=0.002", "trainer.dice_background=false"]
    config = load_config(DEFAULT.with_name(f"{recipe}.yaml"))
    assert config.model_copy(update={"name": "hippocampus_3d"}) == load_config(DEFAULT, [*shared, *overrides])


def test_a_missing_or_looping_parent_config_is_reported_in_one_sentence(tmp_path):
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan\.yaml extends .*gone\.yaml, which does not exist"):
        load_config(orphan)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"Configs extend each other in a loop: .*a\.yaml -> .*b\.yaml -> .*a\.yaml\.$"):
        load_config(tmp_path / "a.yaml")
    listed = tmp_path / "listed.yaml"
    listed.write_text("extends: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match="extends must name one config file"):
        load_config(listed)
