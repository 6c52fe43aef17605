"""`segment export --format onnx|torchscript`: the bundled model as one graph file whose inputs
are the volume and the skip mask, run outside PyTorch's module (ONNX Runtime, a loaded
TorchScript file) and matched against PyTorch's own logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import yaml
from typer.testing import CliRunner

from segment.cli import app
from segment.models import load_model
from segment.models.graph_export import CONFIG_KEY
from segment.models.sources import resolve_model

ort = pytest.importorskip("onnxruntime")
MODEL = "hippocampus_3d"
# Two skip masks, two volume sizes that differ from the one the graph was traced with.
CHECKS = (((1, 1, 35, 51, 35), (1, 1, 1, 1)), ((2, 1, 40, 44, 30), (1, 0, 1, 0)))


@pytest.fixture(scope="module")
def ensemble():
    network, config = load_model(resolve_model(MODEL))
    return network.float().eval(), config


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "hippocampus.onnx"
    result = CliRunner().invoke(app, ["export", MODEL, "--format", "onnx", "--output", str(path)])
    assert result.exit_code == 0, result.output
    return path


def expected_logits(ensemble, shape, mask) -> tuple[torch.Tensor, torch.Tensor]:
    network, _ = ensemble
    volume = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        return volume, network(volume, list(mask))


@pytest.mark.slow
def test_the_onnx_graph_matches_pytorch_for_two_skip_masks_at_any_size(onnx_file, ensemble):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "skip_mask"]
    for shape, mask in CHECKS:
        volume, expected = expected_logits(ensemble, shape, mask)
        (logits,) = session.run(None, {"image": volume.numpy(), "skip_mask": np.array(mask, dtype=np.float32)})
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_onnx_file_carries_the_config_that_says_how_to_prepare_a_scan(onnx_file, ensemble):
    props = {prop.key: prop.value for prop in onnx.load(str(onnx_file)).metadata_props}
    recipe = yaml.safe_load(props[CONFIG_KEY])
    assert recipe["data"]["modality"] == ensemble[1].data.modality and recipe["name"] == MODEL


def test_the_torchscript_file_matches_pytorch_for_two_skip_masks(tmp_path, ensemble):
    path = tmp_path / "hippocampus.pt"
    result = CliRunner().invoke(app, ["export", MODEL, "--format", "torchscript", "--output", str(path)])
    assert result.exit_code == 0, result.output
    extra = {"config.yaml": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert yaml.safe_load(extra["config.yaml"])["name"] == MODEL
    for shape, mask in CHECKS:
        volume, expected = expected_logits(ensemble, shape, mask)
        with torch.no_grad():
            logits = loaded(volume, torch.tensor(mask, dtype=torch.float32))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_an_unknown_format_and_float16_graphs_are_refused_in_one_sentence(tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(app, ["export", MODEL, "--format", "tflite", "--output", str(tmp_path / "m")])
    assert unknown.exit_code == 2
    assert unknown.output.strip().splitlines()[-1] == "Error: --format tflite: use folder, onnx or torchscript."
    half = runner.invoke(app, ["export", MODEL, "--format", "onnx", "--float16", "--output", str(tmp_path / "m.onnx")])
    assert half.exit_code == 2 and "exported in float32" in half.output
    assert not any(tmp_path.iterdir())
