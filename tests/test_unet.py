"""The U-Net family: shapes, skip switches, skip dropout and gradients, on CPU."""

import pytest
import torch

from segment.config import ModelConfig
from segment.errors import InputError
from segment.models import build_model
from segment.models.blocks import InstanceNorm

ODD_SIZES = {2: (37, 51), 3: (19, 27, 21)}


def small_config(**changes) -> ModelConfig:
    base = {"spatial_dims": 3, "out_channels": 3, "levels": 4, "base_channels": 4}
    return ModelConfig(**(base | changes))


def make_input(spatial_dims: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, *ODD_SIZES[spatial_dims], generator=generator)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("encoder", ["plain", "resnet"])
@pytest.mark.parametrize("skip_mode", ["concat", "add"])
def test_output_has_input_size_for_every_variant(spatial_dims, encoder, skip_mode):
    model = build_model(small_config(spatial_dims=spatial_dims, encoder=encoder, skip_mode=skip_mode)).eval()
    x = make_input(spatial_dims)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3, *ODD_SIZES[spatial_dims])
    assert torch.isfinite(logits).all()


def test_bottleneck_resnet_encoder_derives_decoder_widths():
    model = build_model(small_config(encoder="resnet", block="bottleneck", channels=(8, 16, 32, 64)))
    assert model.encoder.out_channels == (8, 16, 32, 64)
    assert model(make_input(3)).shape == (2, 3, *ODD_SIZES[3])


@pytest.mark.parametrize("skip_mode", ["concat", "add"])
def test_switching_any_single_skip_off_changes_the_output(skip_mode):
    model = build_model(small_config(skip_mode=skip_mode)).eval()
    x = make_input(3)
    with torch.no_grad():
        encoding = model.encode(x)
        all_on = model.decode(encoding)
        for level in range(model.num_skips):
            mask = [1] * model.num_skips
            mask[level] = 0
            off = model.decode(encoding, mask)
            assert off.shape == all_on.shape
            assert not torch.allclose(off, all_on), f"switching off skip {level + 1} changed nothing"


@pytest.mark.parametrize("skip_mode", ["concat", "add"])
def test_all_skips_off_equals_zeros_fed_into_the_skips(skip_mode):
    model = build_model(small_config(skip_mode=skip_mode)).eval()
    with torch.no_grad():
        encoding = model.encode(make_input(3))
        switched_off = model.decode(encoding, [0] * model.num_skips)
        zeroed = [torch.zeros_like(f) for f in encoding[:-1]] + [encoding[-1]]
        fed_zeros = model.decode(zeroed, None)
    torch.testing.assert_close(switched_off, fed_zeros, rtol=0, atol=0)


def test_forward_is_encode_then_decode():
    model = build_model(small_config()).eval()
    x = make_input(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, [1, 0, 1]), model.decode(model.encode(x), [1, 0, 1]))


def test_skip_mask_of_wrong_length_is_refused_with_a_clear_sentence():
    model = build_model(small_config()).eval()
    with pytest.raises(InputError, match="has 2 entries but this model has 3 long skips"):
        model(make_input(3), [1, 0])


@pytest.mark.parametrize("encoder", ["plain", "resnet"])
@pytest.mark.parametrize("skips", [None, [0, 0, 0]])
def test_gradients_reach_the_first_encoder_layer(encoder, skips):
    model = build_model(small_config(encoder=encoder)).train()
    model(make_input(3), skips).square().mean().backward()
    first_conv = next(p for name, p in model.encoder.named_parameters() if p.dim() == 5)
    assert first_conv.grad is not None
    assert first_conv.grad.abs().sum() > 0


def test_skip_dropout_drops_skips_only_in_training_mode():
    torch.manual_seed(0)
    model = build_model(small_config(skip_dropout=0.5))
    x = make_input(3, batch=1)
    with torch.no_grad():
        model.eval()
        all_on = model(x)
        assert all(torch.equal(model(x), all_on) for _ in range(10)), "eval mode must not drop skips"
        # Instance norm keeps no running statistics, so train mode differs only by dropout.
        model.train()
        train_outputs = [model(x) for _ in range(20)]
    assert any(not torch.allclose(out, all_on) for out in train_outputs)
    assert any(torch.allclose(out, all_on) for out in train_outputs)


def test_no_skip_dropout_means_train_mode_matches_eval_mode():
    model = build_model(small_config(skip_dropout=0.0))
    x = make_input(3, batch=1)
    with torch.no_grad():
        eval_out = model.eval()(x)
        train_out = model.train()(x)
    torch.testing.assert_close(train_out, eval_out)


def test_per_level_skip_dropout_never_drops_a_level_with_probability_zero():
    torch.manual_seed(0)
    model = build_model(small_config(skip_dropout=(0.0, 0.0, 0.9))).train()
    x = make_input(3, batch=1)
    with torch.no_grad():
        outputs = [model(x) for _ in range(10)]
        allowed = [model.eval()(x, mask) for mask in ([1, 1, 1], [1, 1, 0])]
    for out in outputs:
        assert any(torch.allclose(out, reference) for reference in allowed)


def test_a_model_built_without_skips_uses_that_mask_by_default():
    model = build_model(small_config(skips=(0, 0, 0))).eval()
    x = make_input(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, [0, 0, 0]), rtol=0, atol=0)
        assert not torch.allclose(model(x), model(x, [1, 1, 1]))


def test_deep_supervision_adds_coarser_outputs_in_training_only():
    model = build_model(small_config(deep_supervision=2))
    x = make_input(3)
    outputs = model.train()(x)
    # Each coarser level is half its finer neighbour's size, rounded up.
    assert [tuple(o.shape[2:]) for o in outputs] == [(19, 27, 21), (10, 14, 11), (5, 7, 6)]
    sum(o.square().mean() for o in outputs[1:]).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.deep_supervision_heads.parameters()
    )
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, 19, 27, 21)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_instance_norm_is_torchs_instance_norm_and_keeps_channels_last(spatial_dims):
    torch_norm = (torch.nn.InstanceNorm2d if spatial_dims == 2 else torch.nn.InstanceNorm3d)(6, affine=True)
    with torch.no_grad():
        torch_norm.weight.uniform_(0.5, 2.0)
        torch_norm.bias.uniform_(-1.0, 1.0)
    ours = InstanceNorm(6)
    ours.load_state_dict(torch_norm.state_dict())  # weights trained with either load into the other
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    x = (3 * torch.randn(2, 6, *(9, 7, 5)[:spatial_dims]) + 1).contiguous(memory_format=layout)
    out = ours(x)
    torch.testing.assert_close(out, torch_norm(x), atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=layout)
