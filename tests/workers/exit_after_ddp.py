"""Worker: a DDP step, then the hpcdiff exit path with work still pending in other places.

Leaves through ``dist.exit_process(CODE)`` with a log line, an unflushed print, a non-daemon thread still
writing and an idle thread pool, so the test can check that skipping Python's finalization loses none of them.
Usage: exit_after_ddp.py OUT_DIR CODE
"""

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hpcdiff import dist

out, code = Path(sys.argv[1]), int(sys.argv[2])
ctx = dist.init(timeout_s=60)
logging.basicConfig(filename=out / f"rank{ctx.rank}.log", level=logging.INFO)
net = DDP(torch.nn.Linear(4, 1)) if ctx.distributed else torch.nn.Linear(4, 1)
net(torch.randn(2, 4)).sum().backward()
ctx.all_gather_object(ctx.rank)


def late_writer() -> None:
    time.sleep(0.5)
    (out / f"thread{ctx.rank}.done").write_text("done")


threading.Thread(target=late_writer).start()
idle = ThreadPoolExecutor(max_workers=1)  # never shut down: its idle worker must not hold the exit up
idle.submit(lambda: None).result()
logging.getLogger("worker").info("rank %d logged before exit", ctx.rank)
print(f"rank {ctx.rank} printed before exit")  # no flush: exit_process must flush it
ctx.close()
dist.exit_process(code)
