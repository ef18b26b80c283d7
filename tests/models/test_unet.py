"""The UNet: shapes (odd ones too), conditioning and its null embedding, gradients, determinism, bad input."""

import pytest
import torch
from torch import nn

from hpcdiff.config import build
from hpcdiff.errors import ConfigError
from hpcdiff.models import CovariateSpec, UNet, UNetConfig, covariate_specs
from hpcdiff.models.unet import Attention

COVARIATES = [
    CovariateSpec(name="age", kind="continuous", mean=60.0, std=8.0),
    CovariateSpec(name="sex", kind="categorical", levels=["F", "M"]),
]


def _unet(dims, seed=0, **kw):
    """A tiny UNet whose last conv is randomised, so its output is not the zero of a fresh model."""
    torch.manual_seed(seed)
    cfg = dict(dims=dims, base_channels=8, channel_mults=(1, 2, 2), covariates=COVARIATES) | kw
    model = UNet(UNetConfig(**cfg))
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return model.eval()


def _cov(age, sex):
    return {"age": torch.tensor(age, dtype=torch.float32), "sex": torch.tensor(sex)}


@pytest.mark.parametrize(
    ("dims", "shape"),
    [(2, (2, 1, 16, 16)), (2, (2, 1, 15, 21)), (3, (2, 1, 16, 16, 16)), (3, (2, 1, 9, 14, 11)), (3, (1, 2, 5, 6, 7))],
)
def test_output_has_the_input_shape_even_for_sizes_not_divisible(dims, shape):
    model = _unet(dims, in_channels=shape[1], attention_levels=(1, 2))
    x = torch.randn(shape)
    y = model(x, torch.rand(shape[0]), _cov([55.0] * shape[0], [1] * shape[0]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert y.abs().max() > 0


def test_fresh_model_outputs_zero():
    torch.manual_seed(0)
    model = UNet(UNetConfig(dims=2, base_channels=8))
    assert model(torch.randn(2, 1, 8, 8), torch.rand(2)).abs().max() == 0


def test_covariates_change_the_output_and_time_does_too():
    model = _unet(3)
    x, t = torch.randn(2, 1, 8, 8, 8).expand(2, -1, -1, -1, -1), torch.full((2,), 0.4)
    y = model(x, t, _cov([50.0, 80.0], [0, 0]))
    assert (y[0] - y[1]).abs().max() > 1e-4  # age differs
    y = model(x, t, _cov([50.0, 50.0], [0, 1]))
    assert (y[0] - y[1]).abs().max() > 1e-4  # sex differs
    y_t = model(x, torch.tensor([0.1, 0.9]), _cov([50.0, 50.0], [0, 0]))
    assert (y_t[0] - y_t[1]).abs().max() > 1e-4


def test_dropped_samples_ignore_their_covariates_and_match_unconditional():
    model = _unet(2)
    x, t = torch.randn(1, 1, 12, 12).expand(3, -1, -1, -1), torch.full((3,), 0.3)
    drop = torch.tensor([True, True, False])
    y = model(x, t, _cov([40.0, 75.0, 75.0], [0, 1, 1]), drop)
    torch.testing.assert_close(y[0], y[1], rtol=0, atol=0)
    assert (y[1] - y[2]).abs().max() > 1e-4  # same covariates, only the drop differs
    torch.testing.assert_close(model(x, t, None)[:2], y[:2], rtol=0, atol=0)


def test_missing_values_use_that_covariates_null_embedding():
    torch.manual_seed(0)
    model = _unet(2, covariates=COVARIATES[:1])
    x, t = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1), torch.full((2,), 0.5)
    y = model(x, t, {"age": torch.tensor([float("nan"), 70.0])}, torch.tensor([False, True]))
    torch.testing.assert_close(y[0], y[1], rtol=0, atol=0)
    y = _unet(2)(x, t, {"age": torch.tensor([60.0, 60.0]), "sex": torch.tensor([-1, 1])})
    assert torch.isfinite(y).all() and (y[0] - y[1]).abs().max() > 1e-4


def test_bad_covariates_and_inputs_raise_clear_errors():
    model = _unet(2)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match=r"'sex' has level index 2, outside 0..1 \(levels \['F', 'M'\]\)"):
        model(x, t, _cov([50.0, 60.0], [0, 2]))
    with pytest.raises(ValueError, match="must hold int64 level indices"):
        model(x, t, {"age": torch.tensor([50.0, 60.0]), "sex": torch.tensor([0.0, 1.0])})
    with pytest.raises(ValueError, match=r"covariates \['sex'\] are missing"):
        model(x, t, {"age": torch.tensor([50.0, 60.0])})
    with pytest.raises(ValueError, match=r"expects \(batch, C, H, W\) with C=1, got shape \(2, 1, 8, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8, 8), t)
    with pytest.raises(ValueError, match=r"t has shape \(3,\)"):
        model(x, torch.rand(3))


def test_extra_covariate_keys_are_ignored():
    model = _unet(2)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    plain = model(x, t, _cov([50.0, 60.0], [0, 1]))
    extra = model(x, t, _cov([50.0, 60.0], [0, 1]) | {"group": torch.tensor([3, 4])})
    torch.testing.assert_close(plain, extra, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_every_parameter_gets_a_gradient(dims):
    model = _unet(dims, attention_levels=(2,)).train()
    x = torch.randn((2, 1) + (8,) * dims)
    model(x, torch.rand(2), _cov([50.0, 60.0], [0, 1]), torch.tensor([False, False])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs every parameter in the graph
    assert model.conv_in.weight.grad.abs().max() > 0 and model.cond.encoders["age"][0].weight.grad.abs().max() > 0


def test_same_seed_gives_the_same_model_and_output():
    x, t, cov = torch.randn(2, 1, 9, 10, 11), torch.rand(2), _cov([50.0, 60.0], [0, 1])
    a, b, c = _unet(3, seed=1), _unet(3, seed=1), _unet(3, seed=2)
    torch.testing.assert_close(a(x, t, cov), b(x, t, cov), rtol=0, atol=0)
    assert (a(x, t, cov) - c(x, t, cov)).abs().max() > 0


def test_attention_equals_naive_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(64, head_channels=32)
    x = torch.randn(2, 64, 3, 4, 5)
    q, k, v = attn.qkv(attn.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
    heads = [
        torch.softmax(qh @ kh.transpose(1, 2) / 32**0.5, dim=-1) @ vh
        for qh, kh, vh in zip(q.chunk(2, -1), k.chunk(2, -1), v.chunk(2, -1))
    ]
    expected = x + attn.proj(torch.cat(heads, -1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_config_from_yaml_mapping_and_its_errors():
    cfg = build(
        UNetConfig,
        {"dims": 3, "channel_mults": [1, 2], "covariates": [{"name": "sex", "kind": "categorical", "levels": ["F"]}]},
    )
    assert cfg.channel_mults == (1, 2) and cfg.covariates[0].levels == ["F"]
    with pytest.raises(ConfigError, match="model.attention_levels"):
        UNetConfig(dims=2, channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ConfigError, match="model.dims"):
        UNetConfig(dims=4)
    with pytest.raises(ConfigError, match="did you mean 'num_res_blocks'"):
        build(UNetConfig, {"dims": 2, "num_resblocks": 2})
    with pytest.raises(ConfigError, match="'age'.std"):
        CovariateSpec(name="age", kind="continuous", std=0.0)


def test_covariate_specs_from_a_manifest_schema():
    schema = {
        "age": {"kind": "continuous", "min": 40, "max": 80, "mean": 61.5, "std": 7.25},
        "sex": {"kind": "categorical", "levels": ["F", "M"]},
    }
    age, sex = covariate_specs(schema)
    assert (age.kind, age.mean, age.std) == ("continuous", 61.5, 7.25)
    assert (sex.kind, sex.levels) == ("categorical", ["F", "M"])
    assert [s.name for s in covariate_specs(schema, ["sex"])] == ["sex"]
    with pytest.raises(ConfigError, match="'sx' is not in the shards' manifest: did you mean 'sex'"):
        covariate_specs(schema, ["sx"])


def test_checkpointing_gives_the_same_output_and_gradients_bit_for_bit():
    x, t = torch.rand(2, 1, 8, 8, 8), torch.tensor([0.2, 0.7])
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        net = UNet(UNetConfig(dims=3, base_channels=8, channel_mults=(1, 2), dropout=0.1, checkpointing=flag))
        torch.manual_seed(1)  # dropout draws from the global generator: the recomputation must replay it
        out = net(x, t)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    assert torch.equal(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
