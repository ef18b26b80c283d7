"""Worker: one rank of a Loader run. Args: SHARDS OUT_DIR START_POSITION STEPS (batch 2, seed 9).

Writes OUT_DIR/rank<r>.json with the stream positions and subject ids it was given and the final position, so a
test can check exactly-once coverage across ranks and across a resume on another number of ranks.
"""

import json
import sys
from itertools import islice
from pathlib import Path

from hpcdiff.data.loader import Loader
from hpcdiff.data.shards import ShardSet
from hpcdiff.dist import detect_topology

root, out, start, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
topo = detect_topology()
shards = ShardSet.open(root)
loader = Loader(shards, batch_size=2, rank=topo.rank, world_size=topo.world_size, seed=9, start_position=start)
positions, indices = [], []
for batch in islice(iter(loader), steps):
    # Check the bytes too: voxel (0,0,0,0) of subject i holds i.
    assert batch.x[:, 0, 0, 0, 0].long().tolist() == batch.indices.tolist()
    positions += list(range(batch.position, batch.position + 2))
    indices += batch.indices.tolist()
loader.close()
out.mkdir(parents=True, exist_ok=True)
record = {"rank": topo.rank, "positions": positions, "indices": indices, "position": loader.position}
(out / f"rank{topo.rank}.json").write_text(json.dumps(record))
