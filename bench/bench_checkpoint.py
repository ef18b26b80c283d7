"""Checkpoint write speed against a raw write of the same bytes to the same disk, in the same run.

Training waits only for a host copy of the state (the stall). On a background thread that overlaps training, the
copy is serialised, written (hashed as it is written), fsynced, marked, renamed, read back and pruned. The raw
baseline writes the serialised bytes once and fsyncs. Also: what the stall costs at a checkpoint interval of N
steps of a given step time.

    .venv/bin/python bench/bench_checkpoint.py [--params-m 25] [--repeats 3] [--every 100] [--step-ms 300]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcdiff import checkpoint  # noqa: E402


def state_of(num_params: int) -> dict:
    """Model + EMA + AdamW moments: four tensors' worth of bytes per parameter, as in training."""
    g = torch.Generator().manual_seed(0)
    chunks = [num_params // 8] * 8
    model = {f"layer{i}.weight": torch.randn(n, generator=g) for i, n in enumerate(chunks)}
    ema = {k: v.clone() for k, v in model.items()}
    params = [torch.nn.Parameter(v.clone()) for v in model.values()]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return {"model": model, "ema": ema, "optimizer": opt.state_dict(), "step": 1}


def raw_write(path: Path, data: bytes) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-m", type=float, default=25.0, help="model parameters, millions")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--every", type=int, default=100, help="checkpoint interval in steps (the default config)")
    p.add_argument("--step-ms", type=float, default=300.0, help="training step time to weigh the stall against")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    state = state_of(int(args.params_m * 1e6))
    digest = checkpoint.weights_sha256(state["model"], state["ema"])
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        raw, stall, full = [], [], []
        saver = checkpoint.Saver(root / "checkpoints", keep_last=2)
        for i in range(args.repeats):
            raw.append(raw_write(root / f"raw-{i}.bin", data))
            t0 = time.perf_counter()
            saver.save(i + 1, state, digest)  # what training waits for: a host copy of the state
            stall.append(time.perf_counter() - t0)
            saver.wait()  # + serialise, write, fsync, rename, read back, prune: all behind training
            full.append(time.perf_counter() - t0)
        saver.close()
        raw_s, stall_s, full_s = min(raw), min(stall), min(full)
    finally:
        shutil.rmtree(root)
    size = len(data)
    print(f"checkpoint of {args.params_m:g}M parameters (model + EMA + AdamW): {size / 2**20:.0f} MiB")
    mib = size / 2**20
    for what, seconds in (
        ("raw write + fsync", raw_s),
        ("training stall (host copy)", stall_s),
        ("whole checkpoint, behind it", full_s),
    ):
        ratio = "" if seconds is raw_s else f" = {raw_s / seconds:.2f} of raw"
        print(f"{what:<30} {mib / seconds:6.0f} MiB/s  ({seconds:.3f} s){ratio}")
    overhead = stall_s / (args.every * args.step_ms / 1e3)
    print(
        f"stall per checkpoint {stall_s:.3f} s; every {args.every} steps of {args.step_ms:g} ms: {100 * overhead:.2f}%"
    )


if __name__ == "__main__":
    main()
