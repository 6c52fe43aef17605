"""Models round-trip through safetensors + YAML exactly, and bad model folders are refused."""

import pytest
import torch

from segment.config import ExperimentConfig, ModelConfig
from segment.errors import InputError
from segment.models import (
    ModelLoadError,
    UNetEnsemble,
    build_model,
    export_model,
    load_model,
    save_ensemble,
    save_model,
)
from segment.models.serialization import load_members


def experiment(**model_changes) -> ExperimentConfig:
    spec = {"spatial_dims": 3, "out_channels": 3, "levels": 4, "base_channels": 4} | model_changes
    return ExperimentConfig(name="tiny", model=ModelConfig(**spec))


@pytest.mark.parametrize("encoder", ["plain", "resnet"])
def test_save_then_load_reproduces_outputs_exactly(tmp_path, encoder):
    config = experiment(encoder=encoder, skip_dropout=0.3)
    torch.manual_seed(1)
    model = build_model(config.model)
    # Train a step so that norms and weights are not at their initial values.
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(torch.randn(1, 1, 16, 16, 16)).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.eval()
    x = torch.randn(1, 1, 17, 23, 19)
    save_model(model, config, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", "model.safetensors"]
    loaded, loaded_config = load_model(tmp_path / "m")
    assert loaded_config == config
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded(x, [0, 1, 0]), model(x, [0, 1, 0]))


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        load_model(tmp_path)


def test_corrupt_weights_give_a_clear_error(tmp_path):
    config = experiment()
    save_model(build_model(config.model), config, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ModelLoadError, match="is not a readable safetensors file"):
        load_model(tmp_path)


def test_weights_from_another_architecture_are_refused(tmp_path):
    save_model(build_model(experiment().model), experiment(), tmp_path)
    (tmp_path / "config.yaml").write_text(
        (tmp_path / "config.yaml").read_text().replace("levels: 4", "levels: 3")
    )
    with pytest.raises(ModelLoadError, match="does not match the architecture"):
        load_model(tmp_path)


def trained_like(config: ExperimentConfig, seed: int) -> torch.nn.Module:
    """A model with weights away from their initial values (instance norm would hide a scale)."""
    torch.manual_seed(seed)
    model = build_model(config.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_an_ensemble_predicts_the_mean_of_its_members_softmax_with_the_skip_mask_in_each(tmp_path):
    narrow, wide = experiment(), experiment(channels=(6, 8, 16, 24))
    members = [(trained_like(narrow, 1), narrow), (trained_like(wide, 2), wide)]
    save_ensemble(members, tmp_path / "pair")
    assert sorted(p.name for p in (tmp_path / "pair").iterdir()) == ["ensemble.yaml", "member_1", "member_2"]
    ensemble, config = load_model(tmp_path / "pair")
    assert isinstance(ensemble, UNetEnsemble) and config == narrow and not ensemble.training
    x = torch.randn(1, 1, 17, 23, 19)
    with torch.no_grad():
        for skips in (None, [0, 1, 0]):
            expected = torch.stack([model(x, skips).softmax(1) for model, _ in members]).mean(0)
            assert torch.allclose(ensemble(x, skips).softmax(1), expected, atol=1e-6)
        # The viewer's path: encode once, decode per skip setting.
        features = ensemble.encode(x)
        assert torch.equal(ensemble.decode(features, [1, 0, 1]), ensemble(x, [1, 0, 1]))
    with pytest.raises(InputError, match="has 2 entries but this model has 3"):
        ensemble(x, [1, 0])


def test_float16_weights_halve_the_folder_and_predict_the_same_labels(tmp_path):
    config = experiment(base_channels=8)
    members = [(trained_like(config, seed), config) for seed in (1, 2)]
    save_ensemble(members, tmp_path / "fp32")
    save_ensemble(members, tmp_path / "fp16", torch.float16)
    size = {
        name: sum(f.stat().st_size for f in (tmp_path / name).rglob("*.safetensors"))
        for name in ("fp32", "fp16")
    }
    assert size["fp16"] < 0.55 * size["fp32"]
    full, _ = load_model(tmp_path / "fp32")
    half, _ = load_model(tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        agreement = (full(x).argmax(1) == half(x).argmax(1)).float().mean()
    assert agreement > 0.999


def test_export_copies_a_model_or_an_ensemble_with_every_members_own_config(tmp_path):
    config = experiment(base_channels=8)
    other = config.model_copy(update={"trainer": config.trainer.model_copy(update={"lr": 0.01})})
    save_model(trained_like(config, 1), config, tmp_path / "single")
    save_ensemble([(trained_like(config, 1), config), (trained_like(other, 2), other)], tmp_path / "pair")
    export_model(tmp_path / "single", tmp_path / "single_copy")
    export_model(tmp_path / "pair", tmp_path / "pair_fp16", torch.float16)
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "single_copy")[0](x), load_model(tmp_path / "single")[0](x))
        labels = {name: load_model(tmp_path / name)[0](x).argmax(1) for name in ("pair", "pair_fp16")}
    assert (labels["pair_fp16"] == labels["pair"]).float().mean() > 0.999
    assert [c.trainer.lr for _, c in load_members(tmp_path / "pair_fp16")] == [config.trainer.lr, 0.01]
    weights = {
        name: (tmp_path / name / "member_2" / "model.safetensors").stat().st_size
        for name in ("pair", "pair_fp16")
    }
    assert weights["pair_fp16"] < 0.55 * weights["pair"]
    with pytest.raises(FileExistsError, match="already exists"):
        export_model(tmp_path / "single", tmp_path / "pair")
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        export_model(tmp_path / "nothing_here", tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair", "pair_fp16", "single", "single_copy"]


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"model": {"out_channels": 2}}, "model.out_channels"),
        ({"model": {"levels": 3}}, "model.levels"),
        ({"model": {"long_skips": (1, 0, 1)}}, "model.long_skips"),
        ({"data": {"modality": "ct"}}, "data.modality"),
        ({"labels": {0: "background", 1: "head", 2: "tail"}}, "labels"),
    ],
)
def test_members_that_cannot_be_averaged_are_refused_by_name(tmp_path, change, setting):
    first = experiment()
    tree = first.model_dump()
    for section, values in change.items():
        tree[section] = values if section == "labels" else {**tree[section], **values}
    second = ExperimentConfig(**tree)
    members = [(build_model(first.model), first), (build_model(second.model), second)]
    with pytest.raises(ModelLoadError, match=f"member 2 differs from member 1 in {setting}"):
        save_ensemble(members, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []


def test_an_ensemble_listing_that_points_outside_its_folder_is_refused(tmp_path):
    config = experiment()
    save_model(build_model(config.model), config, tmp_path / "elsewhere")
    save_ensemble([(build_model(config.model), config)] * 2, tmp_path / "pair")
    (tmp_path / "pair" / "ensemble.yaml").write_text("members: [member_1, ../elsewhere]\n")
    with pytest.raises(ModelLoadError, match="may only name folders directly inside"):
        load_model(tmp_path / "pair")
    for listing in (b"members: member_1\n", b"\xff\xfe not text", b"members: [member_1"):
        (tmp_path / "pair" / "ensemble.yaml").write_bytes(listing)
        with pytest.raises(ModelLoadError, match="must list at least two member folders"):
            load_model(tmp_path / "pair")
