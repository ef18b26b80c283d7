"""One generator per sample: a sample's noise depends on its own seed, never on its batch-mates."""

import pytest
import torch

from hpcdiff.models import DDPM, FlowMatching, UNet, UNetConfig
from hpcdiff.models.objective import randn


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_per_sample_draws_equal_separate_draws():
    together = randn((3, 1, 4, 4), _gens(1, 2, 3), torch.device("cpu"))
    for i, seed in enumerate((1, 2, 3)):
        alone = randn((1, 1, 4, 4), _gens(seed), torch.device("cpu"))
        assert torch.equal(together[i], alone[0])


def test_generator_count_must_match_batch():
    with pytest.raises(ValueError, match="one per sample"):
        randn((3, 1, 4), _gens(1, 2), torch.device("cpu"))


@pytest.mark.parametrize("objective", [FlowMatching(), DDPM(num_timesteps=50)], ids=["flow", "ddpm"])
def test_batch_loss_is_the_mean_of_per_sample_losses(objective):
    torch.manual_seed(0)
    model = UNet(UNetConfig(dims=2, base_channels=8, channel_mults=(1, 2)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # the last conv starts at zero: give the model a non-zero output
    x = torch.randn(2, 1, 8, 8)
    both = objective.loss(model, x, None, _gens(10, 11))
    one = objective.loss(model, x[:1], None, _gens(10))
    two = objective.loss(model, x[1:], None, _gens(11))
    assert both.item() == pytest.approx((one.item() + two.item()) / 2, rel=1e-5)


def test_sampling_with_per_sample_generators_is_independent_of_batching():
    torch.manual_seed(0)
    model = UNet(UNetConfig(dims=2, base_channels=8, channel_mults=(1, 2))).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    flow = FlowMatching()
    both = flow.sample(model, (2, 1, 8, 8), None, _gens(5, 6), steps=4)
    second = flow.sample(model, (1, 1, 8, 8), None, _gens(6), steps=4)
    assert torch.allclose(both[1], second[0], atol=1e-5)
