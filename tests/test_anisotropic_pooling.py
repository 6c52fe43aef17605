"""Per-level, per-axis pooling (``model.pooling``): the default is today's network bit for bit,
and an anisotropic one pools, upsamples, supervises, pads, labels, exports and trains per axis."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, set_args, tiny_hippocampus_overrides
from segment.app.page_state import level_labels
from typer.testing import CliRunner

from segment import workflows
from segment.cli import app
from segment.config import ConfigError, ExperimentConfig, ModelConfig, load_config
from segment.engine.preparation import _pad_tiny
from segment.engine.skip_explorer import SkipExplorer
from segment.io import Scan, read_scan
from segment.models import UNet, build_model
from segment.models.ensemble import mismatch
from segment.models.graph_export import export_graph
from segment.reporting import level_name
from segment.training.callbacks import BEST_MODEL_DIR
from segment.training.checkpoint import load_checkpoint
from segment.training.setup import training_loss

CONFIG = ROOT / "configs" / "hippocampus_3d.yaml"
ANISOTROPIC = [[2, 2, 1], [2, 2, 1], [2, 2, 2]]
INPUT = (1, 1, 40, 40, 9)
LEVEL_SIZES = [(40, 40, 9), (20, 20, 9), (10, 10, 9), (5, 5, 5)]
# Each bundled model's mean logit per label on a seeded random input, computed with the code
# before model.pooling existed: its weights and outputs must not move.
BUNDLED = {
    "hippocampus_3d": ((1, 1, 35, 51, 33), (-0.0494663, -9.9765749, -11.6911850)),
    "isbi2012_2d": ((1, 1, 67, 45), (1.6575670, -1.2599056)),
}


def tiny(**changes) -> ModelConfig:
    base = {"levels": 4, "base_channels": 4, "out_channels": 3, "pooling": ANISOTROPIC}
    return ModelConfig(**(base | changes))


def seeded(shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def seeded_model(config: ModelConfig) -> UNet:
    torch.manual_seed(0)
    return build_model(config).eval()


def experiment(*overrides: str) -> ExperimentConfig:
    return load_config(CONFIG, ["model.levels=3", "model.base_channels=4", *overrides])


# --- the default is today's network ------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    ("encoder", "block"), [("plain", "basic"), ("resnet", "basic"), ("resnet", "bottleneck")]
)
def test_default_pooling_is_2_along_every_axis_with_the_same_weights_and_outputs(
    spatial_dims, encoder, block
):
    common = {"spatial_dims": spatial_dims, "encoder": encoder, "block": block, "pooling": None}
    default = tiny(**common)
    explicit = tiny(**(common | {"pooling": [[2] * spatial_dims] * 3}))
    assert default.pool_factors == explicit.pool_factors == ((2,) * spatial_dims,) * 3
    assert default.level_scales == tuple((2**level,) * spatial_dims for level in range(4))
    first, second = seeded_model(default), seeded_model(explicit)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert list(first_state) == list(second_state)
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    x = seeded((1, 1, 19, 27, 21)[: 2 + spatial_dims])
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_models_without_a_pooling_key_load_and_predict_as_before(name):
    loaded = workflows.load(name, device="cpu")
    assert loaded.config.model.pooling is None
    shape, means = BUNDLED[name]
    with torch.no_grad():
        logits = loaded.network.float()(seeded(shape))
    assert logits.shape[2:] == shape[2:]
    per_label = logits.mean(dim=(0, *range(2, logits.dim())))
    torch.testing.assert_close(per_label, torch.tensor(means), atol=1e-4, rtol=1e-4)


def test_level_scales_multiply_the_factors_level_by_level():
    config = tiny(levels=3, pooling=[[2, 2, 1], [2, 2, 2]])
    assert config.pool_factors == ((2, 2, 1), (2, 2, 2))
    assert config.level_scales == ((1, 1, 1), (2, 2, 1), (4, 4, 2))


# --- an anisotropic network ---------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["plain", "resnet"])
@pytest.mark.parametrize("skip_mode", ["concat", "add"])
def test_anisotropic_levels_have_per_axis_sizes_and_every_skip_mask_works(encoder, skip_mode):
    model = seeded_model(tiny(encoder=encoder, skip_mode=skip_mode))
    x = seeded(INPUT)
    with torch.no_grad():
        features = model.encode(x)
        assert [tuple(f.shape[2:]) for f in features] == LEVEL_SIZES
        all_on = model.decode(features)
        for mask in itertools.product((0, 1), repeat=model.num_skips):
            logits = model.decode(features, mask)
            assert logits.shape == (1, 3, *INPUT[2:])
            assert torch.equal(logits, model(x, mask))
            assert mask == (1, 1, 1) or not torch.equal(logits, all_on), f"mask {mask} changed nothing"


@pytest.mark.parametrize("encoder", ["plain", "resnet"])
def test_deep_supervision_outputs_have_the_per_axis_level_sizes_and_a_step_trains(encoder):
    model = seeded_model(tiny(encoder=encoder, deep_supervision=2)).train()
    x = seeded(INPUT)
    label = torch.randint(0, 3, INPUT, generator=torch.Generator().manual_seed(1)).float()  # as loaded
    outputs = model(x)
    assert [tuple(o.shape[2:]) for o in outputs] == LEVEL_SIZES[:3]
    loss = training_loss(experiment().trainer)(outputs, label)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert all(head.weight.grad.abs().sum() > 0 for head in model.deep_supervision_heads)


@pytest.mark.parametrize("encoder", ["plain", "resnet"])
def test_a_2d_model_pools_each_in_slice_axis_by_its_own_factor(encoder):
    model = seeded_model(tiny(spatial_dims=2, levels=3, encoder=encoder, pooling=[[2, 1], [2, 2]]))
    x = seeded((2, 1, 24, 7))
    with torch.no_grad():
        assert [tuple(f.shape[2:]) for f in model.encode(x)] == [(24, 7), (12, 7), (6, 4)]
        assert model(x).shape == (2, 3, 24, 7)
        assert model(x, (0, 1)).shape == (2, 3, 24, 7)


@pytest.mark.parametrize(
    ("pooling", "says"),
    [
        ([[2, 2, 1], [2, 2, 2]], "pooling lists 2 entries but a 4-level model pools 3 times"),
        ([[2, 2], [2, 2, 1], [2, 2, 2]], r"pooling of level 2 is \[2, 2\] but the model has 3 spatial axes"),
        ([[2, 2, 1], [3, 2, 1], [2, 2, 2]], r"pooling factors must be 1 or 2, got \[3, 2, 1\] for level 3"),
        ([[2, 2, 1], [2, 2, 1], [1, 1, 1]], "pooling of level 4 is all ones"),
    ],
)
def test_bad_pooling_is_refused_in_one_sentence(pooling, says):
    with pytest.raises(ConfigError, match=says):
        load_config(CONFIG, ["model.levels=4", f"model.pooling={pooling}"])


def test_a_tiny_volume_is_padded_past_the_coarsest_voxel_along_each_axis():
    config = experiment("model.pooling=[[2,2,1],[2,2,2]]")  # one coarsest voxel spans 4 x 4 x 2
    assert _pad_tiny(torch.zeros(1, 1, 3, 4, 2), config).shape == (1, 1, 5, 5, 3)
    unpadded = torch.zeros(1, 1, 3, 4, 3)  # two voxels along Z at the coarsest level
    assert _pad_tiny(unpadded, config) is unpadded


def test_viewer_levels_give_each_axis_its_own_resolution():
    config = experiment("model.levels=4", "model.pooling=[[2,2,1],[2,2,1],[2,2,2]]")
    thick = Scan(np.zeros((8, 9, 10), np.float32), np.diag([0.6, 0.6, 3.6, 1.0]), Path("scan.nii.gz"))
    assert level_labels(config, thick) == [
        "level 1 - full resolution, 0.6 x 0.6 x 3.6 mm",
        "level 2 - 1/2 resolution, 1.2 x 1.2 x 3.6 mm",
        "level 3 - 1/4 resolution, 2.4 x 2.4 x 3.6 mm",
    ]


def test_ensemble_members_must_pool_alike_for_a_skip_mask_to_mean_one_thing():
    default = experiment()
    assert mismatch(default, experiment("model.pooling=[[2,2,2],[2,2,2]]")) is None
    assert mismatch(default, experiment("model.pooling=[[2,2,1],[2,2,2]]")) == "model.pooling"


# --- export and a real training -----------------------------------------------------------------


@pytest.mark.parametrize("format", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_an_anisotropic_model_exports_and_matches_pytorch(tmp_path, format):
    config = experiment("model.levels=4", f"model.pooling={ANISOTROPIC}")
    model = seeded_model(config.model)
    path = export_graph(model, config, format, tmp_path / f"model.{format}")
    for shape, mask in ((INPUT, (1, 1, 1)), ((2, 1, 33, 21, 6), (1, 0, 1))):
        volume = seeded(shape)
        with torch.no_grad():
            expected = model(volume, mask)
        skip_mask = torch.tensor(mask, dtype=torch.float32)
        if format == "onnx":
            ort = pytest.importorskip("onnxruntime")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (logits,) = session.run(None, {"image": volume.numpy(), "skip_mask": skip_mask.numpy()})
            logits = torch.from_numpy(logits)
        else:
            with torch.no_grad():
                logits = torch.jit.load(str(path))(volume, skip_mask)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_segment_train_with_anisotropic_pooling_saves_a_model_that_predicts_the_same_mask(
    tmp_path, hippocampus_root
):
    runs = tmp_path / "runs"
    overrides = [*tiny_hippocampus_overrides(epochs=1), "model.pooling=[[2,2,1],[2,2,2]]", "model.levels=3"]
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(CONFIG),
            "--data-root",
            str(hippocampus_root),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--output-dir",
            str(runs),
            "--device",
            "cpu",
            "--quiet",
            *set_args(overrides),
        ],
    )
    assert result.exit_code == 0, result.output
    (best,) = runs.glob(f"*/{BEST_MODEL_DIR}")
    loaded = workflows.load(str(best), device="cpu")
    assert loaded.config.model.pooling == ((2, 2, 1), (2, 2, 2))
    trained = UNet(loaded.config.model)  # the weights the epoch ended with, from the checkpoint
    trained.load_state_dict(load_checkpoint(best.parent)["model"])
    trained = loaded.runtime.prepare_model(trained).eval()
    scan = read_scan(hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    saved_mask = SkipExplorer(loaded.network, loaded.config, scan, loaded.runtime).mask()
    trained_mask = SkipExplorer(trained, loaded.config, scan, loaded.runtime).mask()
    assert saved_mask.shape == scan.shape
    assert (saved_mask == trained_mask).all()


def test_the_ablation_report_names_each_levels_scale_per_axis():
    assert level_name(2, 5) == "level 2 (1/2)" and level_name(1, 5) == "level 1 (full resolution)"
    pooling = [[2, 2, 1], [2, 2, 2], [2, 2, 2], [1, 2, 1]]
    assert level_name(2, 5, pooling) == "level 2 (1/2 x 1/2 x 1)"
    assert level_name(3, 5, pooling) == "level 3 (1/4 x 1/4 x 1/2)"
    assert level_name(4, 5, [[2, 2, 2]] * 4) == "level 4 (1/8)"
