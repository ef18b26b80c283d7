"""Autoencoder reconstruction quality on held-out subjects against a trilinear baseline with as many values.

Trains the autoencoder with `hpcdiff train` on one built-in cohort, then reconstructs the subjects of another
cohort (another seed: no subject seen in training) from the latent mean with the EMA weights. The baseline keeps
the same number of values as the latent (latent_channels x (D/f)(H/f)(W/f)): trilinear downsampling of each axis
by f / latent_channels^(1/3) and trilinear upsampling back. PSNR and SSIM (3D, uniform 7-voxel window) on [0, 1].
    .venv/bin/python bench/bench_autoencoder.py --out /tmp/ae-bench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from hpcdiff import checkpoint
from hpcdiff.config import build
from hpcdiff.data.shards import ShardSet
from hpcdiff.models import Autoencoder, AutoencoderConfig, psnr, ssim

HPCDIFF = [sys.executable, "-m", "hpcdiff"]


def _run(*args: object) -> None:
    subprocess.run([*HPCDIFF, *map(str, args)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 40, 32])
    ap.add_argument("--subjects", type=int, default=48)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--patch", type=int, nargs=3, default=[16, 16, 16], help="training patch (the shape: whole)")
    ap.add_argument("--run", default="run", help="run directory name under --out")
    ap.add_argument("--no-shortcut", action="store_true", help="the plain networks (model.shortcut: false)")
    args = ap.parse_args()
    out, shape = args.out, args.shape
    for name, seed, n in (("train", 0, args.subjects), ("heldout", 1, 12)):
        if not (out / name / "manifest.json").is_file():
            _run("cohort", "--out", out / f"{name}-bids", "--subjects", n, "--shape", *shape, "--seed", seed)
            _run("ingest", out / f"{name}-bids", "--out", out / name, "--shape", *shape)
    job = {
        "data": {"shards": str(out / "train"), "batch_size": 4, "patch_size": args.patch},
        "model": {
            "kind": "autoencoder",
            "base_channels": 16,
            "channel_mults": [1, 2, 2],
            "latent_channels": 4,
            "shortcut": not args.no_shortcut,
        },
        "objective": {"kind": "autoencoder"},
        "optim": {"lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99},
        "train": {"steps": args.steps, "checkpoint_every": args.steps, "log_every": 50},
    }
    (out / f"{args.run}.yaml").write_text(yaml.safe_dump(job))
    _run("train", out / f"{args.run}.yaml", "--run-dir", out / args.run, "--quiet")

    state = checkpoint.load(checkpoint.latest_valid(out / args.run / "checkpoints"))
    cfg = build(AutoencoderConfig, state["model_config"], "model_config")
    ae = Autoencoder(cfg)
    ae.load_state_dict(state["ema"])
    ae.eval()
    heldout = ShardSet.open(out / "heldout")
    x = torch.from_numpy(heldout.read_many(range(heldout.num_subjects)))
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)[0]).clamp(0, 1)
    factor = cfg.downsample / cfg.latent_channels ** (1 / 3)
    small = [round(s / factor) for s in shape]
    base = F.interpolate(F.interpolate(x, size=small, mode="trilinear"), size=shape, mode="trilinear")
    latent_values = cfg.latent_channels * x[0, 0].numel() // cfg.downsample**3
    print(f"trained {args.steps} steps, batch 4 of {args.patch} patches, shortcut {cfg.shortcut}")
    print(f"held-out subjects {len(x)} of {shape}; latent {cfg.latent_channels}x{[s // cfg.downsample for s in shape]}")
    print(f"values kept: latent {latent_values}, trilinear {small} = {small[0] * small[1] * small[2]}")
    for name, y in (("autoencoder", recon), ("trilinear", base)):
        print(f"{name:12s} PSNR {psnr(y, x).mean():6.2f} dB   SSIM {ssim(y, x):.4f}")


if __name__ == "__main__":
    main()
