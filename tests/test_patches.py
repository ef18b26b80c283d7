"""Training patches: positions are a pure function of (seed, stream position), inside the volume, read exactly."""

import numpy as np
import pytest

from hpcdiff.data.loader import Loader
from hpcdiff.data.patches import patch_corners, patch_selection
from hpcdiff.data.shards import ShardSet
from tests.datagen import blob_shards


def test_corners_depend_on_seed_and_position_only_and_stay_inside():
    positions = np.arange(200)
    a = patch_corners((16, 20, 12), (8, 8, 8), seed=3, positions=positions)
    assert a.shape == (200, 3)
    assert (a >= 0).all() and (a <= np.array([8, 12, 4])).all()
    # Every valid corner along each axis turns up: the draw covers the whole volume.
    assert [len(np.unique(a[:, k])) for k in range(3)] == [9, 13, 5]
    assert np.array_equal(patch_corners((16, 20, 12), (8, 8, 8), 3, positions[50:60]), a[50:60])
    assert not np.array_equal(patch_corners((16, 20, 12), (8, 8, 8), 4, positions), a)
    with pytest.raises(ValueError, match="does not fit"):
        patch_corners((16, 20, 12), (8, 8, 13), 3, positions)


def test_loader_reads_the_same_patches_on_one_or_two_ranks(tmp_path):
    shards = ShardSet.open(blob_shards(tmp_path / "shards", num_subjects=6, shape=(12, 12, 12), per_shard=3))
    patch = (4, 8, 6)
    one = Loader(shards, batch_size=4, rank=0, world_size=1, seed=1, patch_size=patch, prefetch=0).batch_at(8)
    halves = [
        Loader(shards, batch_size=2, rank=r, world_size=2, seed=1, patch_size=patch, prefetch=0).batch_at(8)
        for r in (0, 1)
    ]
    assert one.x.shape == (4, 1, *patch)
    assert np.array_equal(one.x.numpy(), np.concatenate([h.x.numpy() for h in halves]))
    corners = patch_corners(shards.shape, patch, 1, np.arange(8, 12))
    for i, (index, corner) in enumerate(zip(one.indices.tolist(), corners)):
        whole = shards.read(index)[0]
        assert np.array_equal(one.x[i, 0].numpy(), whole[patch_selection(corner, patch)].astype(np.float16))
