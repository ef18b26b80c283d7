"""Data: the synthetic cohort, BIDS ingest into HDF5 shards, the shard format and the distributed loader."""

from hpcdiff.data.cohort import make_cohort
from hpcdiff.data.ingest import IngestResult, ingest
from hpcdiff.data.loader import Batch, Loader, stream_indices
from hpcdiff.data.shards import ShardInfo, ShardSet, verified_shard, write_manifest, write_shard

__all__ = [
    "Batch",
    "IngestResult",
    "Loader",
    "ShardInfo",
    "ShardSet",
    "ingest",
    "make_cohort",
    "stream_indices",
    "verified_shard",
    "write_manifest",
    "write_shard",
]
