"""Why the autoencoder lost to trilinear at a short budget: the same training in one process, variant by variant.

A replica of `hpcdiff train`'s autoencoder step (AdamW, linear warm-up then cosine to 0.1 x lr, gradient clipping
at 1, EMA, the L1 + SSIM + KL loss, random patches) on the shards bench_autoencoder.py writes, so variants of the
model's start can be compared in minutes. Prints held-out PSNR and SSIM of the raw and EMA weights every quarter.
    .venv/bin/python bench/bench_autoencoder.py --out /tmp/ae-bench --steps 1       (writes the shards)
    .venv/bin/python bench/bench_autoencoder_ablation.py --data /tmp/ae-bench --variant plain
Variants: plain (model.shortcut false), random-tail (shortcut, but the encoder head and decoder tail keep their
random initialisation), random-tail-logvar (the same, with the head's log-variance bias at LOGVAR_INIT), default.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpcdiff.data.shards import ShardSet
from hpcdiff.models import Autoencoder, AutoencoderConfig, AutoencoderLossConfig, AutoencoderObjective, psnr, ssim
from hpcdiff.models.autoencoder import LOGVAR_INIT

VARIANTS = ("plain", "random-tail", "random-tail-logvar", "default")


def build(variant: str) -> Autoencoder:
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(base_channels=16, channel_mults=(1, 2, 2), shortcut=variant != "plain"))
    if variant.startswith("random-tail"):
        torch.manual_seed(1)
        head, tail = ae.encoder.stages[-1], ae.decoder.stages[-1]
        head.reset_parameters()
        tail.reset_parameters()
        if variant == "random-tail-logvar":
            with torch.no_grad():
                head.bias[ae.cfg.latent_channels :] = LOGVAR_INIT
    return ae


def evaluate(ae: Autoencoder, x: torch.Tensor) -> tuple[float, float]:
    ae.eval()
    with torch.no_grad():
        r = ae.decode(ae.encode(x)[0]).clamp(0, 1)
    ae.train()
    return float(psnr(r, x).mean()), float(ssim(r, x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, required=True, help="folder with train/ and heldout/ shards")
    ap.add_argument("--variant", choices=VARIANTS, default="default")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--patch", type=int, nargs=3, default=[16, 16, 16])
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train = ShardSet.open(args.data / "train")
    data = torch.from_numpy(train.read_many(range(train.num_subjects)))
    held = ShardSet.open(args.data / "heldout")
    x_ho = torch.from_numpy(held.read_many(range(held.num_subjects)))
    model = build(args.variant)
    ema = copy.deepcopy(model).requires_grad_(False)
    objective = AutoencoderObjective(AutoencoderLossConfig(kind="autoencoder"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, gen, warmup, p = np.random.default_rng(0), torch.Generator().manual_seed(0), 20, args.patch
    high = np.array(data.shape[2:]) - np.array(p) + 1
    t0 = time.time()
    for step in range(args.steps):
        progress = (step - warmup) / max(args.steps - warmup, 1)
        lr = args.lr * ((step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        patches = []
        for i in rng.integers(0, len(data), 4):
            c = rng.integers(0, high)
            patches.append(data[i, :, c[0] : c[0] + p[0], c[1] : c[1] + p[1], c[2] : c[2] + p[2]])
        loss = objective.loss(model, torch.stack(patches), None, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.99, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        if (step + 1) % max(args.steps // 4, 1) == 0:
            raw, avg = evaluate(model, x_ho), evaluate(ema, x_ho)
            print(
                f"{args.variant} step {step + 1} loss {loss.item():.4f} raw PSNR {raw[0]:.2f} SSIM {raw[1]:.3f}  "
                f"EMA PSNR {avg[0]:.2f} SSIM {avg[1]:.3f}  {time.time() - t0:.0f} s",
                flush=True,
            )
    factor = model.cfg.downsample / model.cfg.latent_channels ** (1 / 3)
    shape = tuple(x_ho.shape[2:])
    base = F.interpolate(
        F.interpolate(x_ho, size=[round(s / factor) for s in shape], mode="trilinear"), size=shape, mode="trilinear"
    )
    print(f"trilinear PSNR {psnr(base, x_ho).mean():.2f} SSIM {ssim(base, x_ho):.3f}")


if __name__ == "__main__":
    main()
