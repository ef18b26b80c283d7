"""Run two real training steps of a job on the CPU and print the peak RSS above the baseline before them (JSON).

A fresh process per measurement: max RSS (VmHWM) only grows, so nothing else may have run in it.
"""

import json
import sys

import torch

from hpcdiff.memplan import measure_step
from hpcdiff.train_config import load_job


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    job = load_job(sys.argv[1], sys.argv[5:])
    shape = tuple(int(s) for s in sys.argv[2:5])
    torch.set_num_threads(1)
    # Warm up at a small size: libraries' one-off buffers (oneDNN kernels and caches) belong to the baseline.
    measure_step(job, [8 * m for m in (2, 2, 2)], [], device=torch.device("cpu"))
    baseline = _status_kib("VmRSS")
    measure_step(job, shape, [], device=torch.device("cpu"))
    print(json.dumps({"baseline": baseline * 1024, "peak": _status_kib("VmHWM") * 1024 - baseline * 1024}))


if __name__ == "__main__":
    main()
