"""Data: the synthetic cohort, BIDS ingest into HDF5 shards, the shard format and the distributed loader."""

from hpcdiff.data.shards import ShardInfo, ShardSet, verified_shard, write_manifest, write_shard

__all__ = ["ShardInfo", "ShardSet", "verified_shard", "write_manifest", "write_shard"]
