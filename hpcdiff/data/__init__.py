"""Data: the synthetic cohort, BIDS ingest into HDF5 shards, the shard format and the distributed loader."""

from hpcdiff.data.loader import Batch, Loader, stream_indices
from hpcdiff.data.shards import ShardInfo, ShardSet, verified_shard, write_manifest, write_shard

__all__ = [
    "Batch",
    "Loader",
    "ShardInfo",
    "ShardSet",
    "stream_indices",
    "verified_shard",
    "write_manifest",
    "write_shard",
]
