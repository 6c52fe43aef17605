"""Models round-trip through safetensors + YAML exactly, and bad model folders are refused."""

import pytest
import torch

from segment.config import ExperimentConfig, ModelConfig
from segment.models import ModelLoadError, build_model, load_model, save_model


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
