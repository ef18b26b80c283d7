import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from hpcdiff.data.loader import Loader, _Buffers, slice_indices, stream_indices
from hpcdiff.data.shards import ShardSet, shard_name, write_manifest, write_shard
from tests.harness import PYTHON, ROOT, assert_ok, mpirun

SHAPE = (5, 6, 7)
N = 13
WORKER = ROOT / "tests" / "workers" / "loader_ranks.py"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """13 subjects in shards of 5, 5, 3; voxel (0, 0, 0, k) of subject i holds i and the slice index k along W."""
    root = tmp_path_factory.mktemp("shards")
    infos, table = [], {}
    for s, idx in enumerate(np.array_split(np.arange(N), [5, 10])):
        images = np.zeros((len(idx), 1, *SHAPE), dtype=np.float16)
        images[:, 0] = idx[:, None, None, None]
        images[:, 0] += np.arange(SHAPE[0])[None, :, None, None] * 100
        subjects = {
            "id": [f"s{i:02d}" for i in idx],
            "session": [""] * len(idx),
            "age": idx + 40.0,
            "group": ["patient" if i % 3 == 0 else "control" for i in idx],
        }
        infos.append(write_shard(root / shard_name(s), images, subjects))
        for name, values in subjects.items():
            table.setdefault(name, []).extend(values)
    covariates = {
        "age": {"kind": "continuous", "min": 40.0, "max": 52.0, "mean": 46.0, "std": 3.7},
        "group": {"kind": "categorical", "levels": ["control", "patient"]},
    }
    write_manifest(
        root,
        shape=SHAPE,
        spacing=(1, 1, 1),
        affine=np.eye(4),
        covariates=covariates,
        shards=infos,
        provenance={},
        subjects=table,
    )
    return root


def test_stream_is_a_concatenation_of_permutations():
    stream = stream_indices(N, seed=3, start=0, count=5 * N)
    for e in range(5):
        assert sorted(stream[e * N : (e + 1) * N]) == list(range(N))
    assert not np.array_equal(stream[:N], stream[N : 2 * N])  # epochs are shuffled differently
    assert not np.array_equal(stream[:N], stream_indices(N, seed=4, start=0, count=N))
    # Any window is the matching slice of the whole stream.
    np.testing.assert_array_equal(stream_indices(N, 3, 17, 30), stream[17:47])


@pytest.mark.parametrize("world_sizes", [[1], [2], [3], [3, 2], [2, 3, 1]])
def test_exactly_once_per_epoch_for_any_world_size_and_across_changes(world_sizes):
    """Steps taken with a world size that changes at step boundaries still cover each epoch exactly once."""
    b, position, seen = 4, 0, []
    while position < 4 * N:
        w = world_sizes[(position // (2 * b)) % len(world_sizes)]  # change W every few steps
        for r in range(w):
            seen.extend(stream_indices(N, 7, position + r * b, b))
        position += w * b
    for e in range(4):
        assert Counter(seen[e * N : (e + 1) * N]) == Counter(range(N))


def _take(loader, steps):
    return list(islice(iter(loader), steps))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_real_loader_ranks_together_see_each_subject_once_per_epoch(shard_dir, world_size):
    shards = ShardSet.open(shard_dir)
    b, steps = 3, 9
    per_rank = []
    for r in range(world_size):
        with Loader(shards, batch_size=b, rank=r, world_size=world_size, seed=11) as loader:
            per_rank.append(_take(loader, steps))
            assert loader.position == steps * world_size * b
    stream = []
    for k in range(steps):
        for r in range(world_size):
            batch = per_rank[r][k]
            assert batch.position == k * world_size * b + r * b
            assert batch.x.shape == (b, 1, *SHAPE) and batch.x.dtype == torch.float16
            # The volume really is the subject the index says.
            np.testing.assert_array_equal(batch.x[:, 0, 0, 0, 0].numpy(), batch.indices.numpy())
            np.testing.assert_array_equal(batch.covariates["age"].numpy(), batch.indices.numpy() + 40.0)
            assert batch.covariates["group"].dtype == torch.int64
            np.testing.assert_array_equal(batch.covariates["group"].numpy(), (batch.indices.numpy() % 3 == 0))
            stream.extend(batch.indices.tolist())
    for e in range(len(stream) // N):
        assert Counter(stream[e * N : (e + 1) * N]) == Counter(range(N))
    shards.close()


def test_mid_epoch_restart_yields_the_tail_exactly(shard_dir):
    shards = ShardSet.open(shard_dir)
    full = _take(Loader(shards, batch_size=2, rank=1, world_size=2, seed=5), 10)
    restarted = Loader(shards, batch_size=2, rank=1, world_size=2, seed=5, start_position=3 * 4)
    tail = _take(restarted, 7)
    restarted.close()
    assert len(tail) == 7
    for a, b in zip(full[3:], tail):
        assert a.position == b.position
        assert torch.equal(a.indices, b.indices) and torch.equal(a.x, b.x)
        assert all(torch.equal(a.covariates[k], b.covariates[k]) for k in a.covariates)


def test_position_counts_only_batches_handed_out(shard_dir):
    shards = ShardSet.open(shard_dir)
    loader = Loader(shards, batch_size=2, rank=0, world_size=3, seed=0, prefetch=4)
    it = iter(loader)
    next(it), next(it)
    assert loader.position == 2 * 6  # however far the prefetch thread read ahead
    loader.close()
    # Iterating again continues from there, synchronously too.
    sync = Loader(shards, batch_size=2, rank=0, world_size=3, seed=0, prefetch=0, start_position=loader.position)
    assert torch.equal(next(iter(loader)).indices, next(iter(sync)).indices)
    loader.close()


def test_2d_slices_are_a_function_of_seed_and_position(shard_dir):
    shards = ShardSet.open(shard_dir)
    a = _take(Loader(shards, batch_size=4, rank=0, world_size=1, seed=2, mode="2d", slice_axis=0), 5)
    b = _take(Loader(shards, batch_size=4, rank=0, world_size=1, seed=2, mode="2d", start_position=8), 3)
    assert a[0].x.shape == (4, 1, SHAPE[1], SHAPE[2])
    for x, y in zip(a[2:], b):
        assert torch.equal(x.x, y.x)
    # Voxel values encode subject + 100 * slice: the slice lies in the range and matches slice_indices.
    xs = torch.cat([batch.x for batch in a])
    positions = np.arange(20)
    expected = slice_indices(SHAPE[0], 2, positions, (0.3, 0.7))
    np.testing.assert_array_equal(xs[:, 0, 0, 0].numpy() // 100, expected)
    assert set(expected) <= {1, 2, 3, 4} and len(set(expected)) > 1
    other_axis = _take(Loader(shards, batch_size=2, rank=0, world_size=1, seed=2, mode="2d", slice_axis=2), 1)
    assert other_axis[0].x.shape == (2, 1, SHAPE[0], SHAPE[1])


def test_loader_rejects_bad_arguments(shard_dir):
    shards = ShardSet.open(shard_dir)
    with pytest.raises(ValueError, match="rank"):
        Loader(shards, batch_size=2, rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="slice_range"):
        Loader(shards, batch_size=2, rank=0, world_size=1, seed=0, mode="2d", slice_range=(0.7, 0.3))


@pytest.mark.mpi
def test_loader_under_mpirun_resumed_on_another_world_size(shard_dir, tmp_path):
    """3 real ranks take 4 steps, then 2 real ranks resume at the saved position: each epoch exactly once."""
    first = mpirun(3, [PYTHON, WORKER, shard_dir, tmp_path / "a", "0", "4"], timeout=240)
    assert_ok(first)
    records = [json.loads((tmp_path / "a" / f"rank{r}.json").read_text()) for r in range(3)]
    position = records[0]["position"]
    assert position == 4 * 3 * 2 and all(rec["position"] == position for rec in records)
    second = mpirun(2, [PYTHON, WORKER, shard_dir, tmp_path / "b", str(position), "6"], timeout=240)
    assert_ok(second)
    records += [json.loads((tmp_path / "b" / f"rank{r}.json").read_text()) for r in range(2)]
    by_position = {}
    for rec in records:
        for pos, idx in zip(rec["positions"], rec["indices"]):
            assert pos not in by_position
            by_position[pos] = idx
    assert sorted(by_position) == list(range(position + 6 * 2 * 2))
    stream = [by_position[p] for p in sorted(by_position)]
    for e in range(len(stream) // N):
        assert Counter(stream[e * N : (e + 1) * N]) == Counter(range(N))


def test_batches_in_use_keep_their_values_and_dropped_ones_lend_their_memory(shard_dir):
    """Batch arrays are reused (no fresh pages per batch) only once no tensor of them is left."""
    pool = _Buffers((2, 1, 4), keep=2)
    first = pool.take()
    owner = first.base
    tensor = torch.from_numpy(first)
    del first
    assert pool.take().base is not owner  # a tensor still uses it
    del tensor
    assert pool.take().base is owner  # the last tensor went: its memory is lent again
    shards = ShardSet.open(shard_dir)
    with Loader(shards, batch_size=2, rank=0, world_size=1, seed=3, prefetch=2) as ld:
        it = iter(ld)
        held = [next(it) for _ in range(8)]
        values = [b.x.clone() for b in held]
        for _ in range(8):
            next(it)  # batches dropped at once: their memory goes back to the pool and is reused
        assert all(torch.equal(b.x, v) for b, v in zip(held, values))
    direct = Loader(shards, batch_size=2, rank=0, world_size=1, seed=3, prefetch=0)
    expected = [b.x for b in islice(iter(direct), 24)]
    again = Loader(shards, batch_size=2, rank=0, world_size=1, seed=3, prefetch=2)
    assert all(torch.equal(b.x, e) for b, e in zip(islice(iter(again), 24), expected))
