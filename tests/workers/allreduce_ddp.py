"""Worker: bring up hpcdiff.dist, all-reduce rank+1, take one DDP step; print a JSON line from rank 0.

Run alone (world of one) or under mpirun/srun. The global batch is fixed (8 rows); each rank takes its slice,
so any world size that divides 8 must give the same step.
"""

import json

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hpcdiff import dist

ctx = dist.init(timeout_s=60)
t = torch.tensor([float(ctx.rank + 1)])
ctx.all_reduce_sum(t)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
g = torch.Generator().manual_seed(1)
x = torch.randn(8, 4, generator=g)
y = torch.randn(8, 1, generator=g)
per = 8 // ctx.world_size
xs, ys = x[ctx.rank * per : (ctx.rank + 1) * per], y[ctx.rank * per : (ctx.rank + 1) * per]
net = DDP(model) if ctx.distributed else model
opt = torch.optim.SGD(net.parameters(), lr=0.1)
loss = torch.nn.functional.mse_loss(net(xs), ys)
loss.backward()
opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = ctx.all_gather_object(flat.tolist())
if ctx.is_main:
    print(
        json.dumps(
            {
                "world_size": ctx.world_size,
                "launcher": ctx.topology.launcher,
                "sum": t.item(),
                "params": flat.tolist(),
                "identical_across_ranks": all(p == gathered[0] for p in gathered),
            }
        )
    )
ctx.close()
dist.exit_process(0)
