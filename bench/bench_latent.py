"""Cost of one synthetic volume: latent diffusion (decode included) against pixel-space diffusion, same steps and grid.

Both UNets have the layout of jobs/latent-demo-diffusion.yaml (``--base`` channels, 16 there; mults 1-2-2, one block
per level, no attention: attention over the pixel grid's 11,200 coarsest positions would only widen the gap); the
latent one works on the 4x20x28x20 latent of the demo autoencoder (base 16, mults 1-2-2, 4 channels), the pixel one
on the 80x112x80 image. Weights are random: the cost of a network evaluation does not depend on what it learned.
Sampling is flow matching with Euler steps through ``FlowMatching.sample``, as ``hpcdiff sample`` runs it; the
latent road adds one decode per volume. Also: one training step (forward and backward, batch 1) per subject for
each. One process, ``--threads`` intra-op threads.

    .venv/bin/python bench/bench_latent.py --steps 50 --base 16
"""

from __future__ import annotations

import argparse
import time

import torch

from hpcdiff.models import Autoencoder, AutoencoderConfig, FlowMatching, UNet, UNetConfig

SHAPE = (80, 112, 80)


def _unet(channels: int, base: int) -> UNet:
    cfg = UNetConfig(dims=3, in_channels=channels, base_channels=base, channel_mults=(1, 2, 2), attention_levels=())
    return UNet(cfg).eval().requires_grad_(False)


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _train_step(model: UNet, objective: FlowMatching, shape: tuple[int, ...]) -> float:
    model.train().requires_grad_(True)
    x = torch.randn(shape)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        objective.loss(model, x, None, torch.Generator().manual_seed(0)).backward()

    t = _best(step, 2)
    model.eval().requires_grad_(False)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (both roads)")
    ap.add_argument("--base", type=int, default=16, help="UNet base channels (both roads; the latent demo's: 16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2, help="best of this many")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(base_channels=16, channel_mults=(1, 2, 2), latent_channels=4)).eval()
    ae.requires_grad_(False)
    f = ae.cfg.downsample
    latent_shape = (1, 4, *(s // f for s in SHAPE))
    pixel_shape = (1, 1, *SHAPE)
    objective = FlowMatching()
    latent_net, pixel_net = _unet(4, args.base), _unet(1, args.base)

    def sample(net: UNet, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return objective.sample(net, shape, None, gen, args.steps, sampler="euler")

    with torch.no_grad():
        t_latent = _best(lambda: sample(latent_net, latent_shape), args.reps)
        t_decode = _best(lambda: ae.decode(torch.randn(latent_shape)), args.reps)
        t_pixel = _best(lambda: sample(pixel_net, pixel_shape), args.reps)
    train_latent = _train_step(latent_net, objective, latent_shape)
    train_pixel = _train_step(pixel_net, objective, pixel_shape)
    total = t_latent + t_decode
    print(
        f"grid {list(SHAPE)}, latent {list(latent_shape[1:])}, UNet base {args.base}, {args.steps} Euler steps, "
        f"{args.threads} thread(s)"
    )
    print(f"latent sampling    {t_latent:8.2f} s/volume")
    print(f"latent decode      {t_decode:8.2f} s/volume")
    print(f"latent total       {total:8.2f} s/volume")
    print(f"pixel sampling     {t_pixel:8.2f} s/volume   latent road {t_pixel / total:.1f}x cheaper")
    print(f"train step latent  {train_latent:8.3f} s/subject")
    print(f"train step pixel   {train_pixel:8.3f} s/subject   latent {train_pixel / train_latent:.1f}x cheaper")


if __name__ == "__main__":
    main()
