"""The KL autoencoder: shapes at 4x and 8x, the residual shortcut, config checks, noise only from generators,
checkpointing changes nothing but memory, SSIM against an independent scipy reference, and a loss that falls."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from hpcdiff.errors import ConfigError
from hpcdiff.models import (
    Autoencoder,
    AutoencoderConfig,
    AutoencoderLossConfig,
    AutoencoderObjective,
    kl_divergence,
    psnr,
    ssim,
)
from hpcdiff.models.autoencoder import LOGVAR_INIT, channel_to_space, space_to_channel
from tests.models.test_training import blobs


def _tiny(**kw) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig(base_channels=8, **kw))


@pytest.mark.parametrize(("mults", "factor"), [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_shapes_at_4x_and_8x(mults, factor):
    ae = _tiny(channel_mults=mults, latent_channels=3)
    assert ae.cfg.downsample == factor
    x = torch.rand(2, 1, 16, 24, 32)
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, 16 // factor, 24 // factor, 32 // factor)
    assert ae.decode(mean).shape == x.shape
    recon, _, _ = ae(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"channel_mults": (1, 2)}, "model.channel_mults"),
        ({"channel_mults": (1, 2, 2, 2, 2)}, "model.channel_mults"),
        ({"latent_channels": 2}, "model.latent_channels"),
        ({"latent_channels": 9}, "model.latent_channels"),
        ({"num_res_blocks": 0}, "model.num_res_blocks"),
    ],
)
def test_bad_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        AutoencoderConfig(**kw)


def test_a_size_the_downsampling_does_not_divide_is_refused_with_the_factor():
    with pytest.raises(ValueError, match="divisible by 4"):
        _tiny().encode(torch.rand(1, 1, 16, 18, 16))
    with pytest.raises(ValueError, match="latents"):
        _tiny().decode(torch.rand(1, 1, 4, 4, 4))


def test_latent_noise_comes_from_the_generators_only():
    ae = _tiny()
    x = torch.rand(2, 1, 8, 8, 8)
    torch.manual_seed(1)
    a, _, _ = ae(x, [torch.Generator().manual_seed(s) for s in (5, 6)])
    torch.manual_seed(2)  # the global generator does not matter
    b, _, _ = ae(x, [torch.Generator().manual_seed(s) for s in (5, 6)])
    c, _, _ = ae(x, [torch.Generator().manual_seed(s) for s in (5, 7)])
    assert torch.equal(a, b)
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # each sample's draw is its own


def test_checkpointing_gives_the_same_loss_and_gradients_bit_for_bit():
    x = torch.rand(2, 1, 8, 8, 8)
    objective = AutoencoderObjective(AutoencoderLossConfig(kind="autoencoder"))
    results = []
    for flag in (False, True):
        ae = _tiny(checkpointing=flag)
        loss = objective.loss(ae, x, None, torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in ae.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_ssim_matches_a_scipy_reference_and_psnr_its_formula():
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((12, 14, 16)), 1.0)
    y = x + rng.normal(0, 0.05, x.shape)
    blur = lambda a: ndimage.uniform_filter(a, 7)[3:-3, 3:-3, 3:-3]  # noqa: E731 (valid positions only)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()
    tx, ty = (torch.from_numpy(a).float()[None, None] for a in (x, y))
    assert ssim(tx, ty).item() == pytest.approx(ref, abs=1e-4)
    assert ssim(tx, tx).item() == pytest.approx(1.0, abs=1e-5)
    mse = ((x - y) ** 2).mean()
    assert psnr(tx, ty).item() == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 2, 2, 2)
    assert torch.equal(kl_divergence(zeros, zeros), torch.zeros(2))
    kl = kl_divergence(torch.ones(2, 4, 2, 2, 2), zeros)
    assert torch.allclose(kl, torch.full((2,), 0.5 * 4 * 8))


def test_reconstruction_loss_falls_over_a_short_run():
    data, _ = blobs(3, 2, 12, seed=0)
    data = (data + 1) / 2  # images in [0, 1], as ingest writes them
    ae = _tiny()
    objective = AutoencoderObjective(AutoencoderLossConfig(kind="autoencoder"))
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        loss = objective.loss(ae, data, None, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


def test_space_to_channel_round_trips_and_groups_cover_every_channel():
    x = torch.rand(2, 1, 8, 12, 16)
    z = space_to_channel(x, 4)
    assert z.shape == (2, 64, 2, 3, 4)
    assert torch.equal(z[0, :, 1, 2, 3], x[0, 0, 4:8, 8:12, 12:16].reshape(-1))
    assert torch.equal(channel_to_space(z, 4), x)
    for latent in range(3, 9):
        ae = _tiny(latent_channels=latent)
        assert sum(ae._groups) == 64 and max(ae._groups) - min(ae._groups) <= 1


@pytest.mark.parametrize("latent", [3, 4])
def test_at_initialisation_the_autoencoder_is_the_block_average_codec(latent):
    ae = _tiny(latent_channels=latent)
    x = torch.rand(2, 1, 8, 8, 12)
    mean, logvar = ae.encode(x)
    blocks = space_to_channel(x, 4)
    first = blocks[:, : ae._groups[0]].mean(1)
    torch.testing.assert_close(mean[:, 0], first)
    assert torch.all(logvar == LOGVAR_INIT)
    recon = ae.decode(mean)
    torch.testing.assert_close(
        space_to_channel(recon, 4)[:, : ae._groups[0]], first[:, None].expand_as(blocks[:, : ae._groups[0]])
    )
    plain = _tiny(latent_channels=latent, shortcut=False)
    assert not torch.allclose(plain.decode(plain.encode(x)[0]), recon)
