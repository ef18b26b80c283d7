"""The LZ4 chunk decoder against HDF5's own filter: the same values for every layout the filter writes."""

import h5py
import hdf5plugin
import numpy as np
import pytest

from hpcdiff.data.chunks import ChunkReader, decode_lz4_chunk, whole_volume_lz4
from hpcdiff.errors import ShardError

CASES = [
    # (shape, LZ4 block size in bytes (0: the filter's 1 GiB default), kind of content)
    ((1, 1, 1), 0, "noise"),
    ((5, 7, 3), 0, "zeros"),
    ((5, 7, 3), 0, "noise"),
    ((16, 20, 12), 0, "brain"),
    ((16, 20, 12), 1000, "brain"),  # many blocks, some all background (compressed), some noisy (stored raw)
    ((16, 20, 12), 1000, "noise"),  # many raw blocks, the last one shorter
    ((16, 20, 12), 7680, "zeros"),  # the volume splits into exactly whole blocks
    ((9, 11, 13), 512, "brain"),  # odd sizes: the last block is a stub
]


def _volumes(shape, kind, n=3, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return np.zeros((n, 1, *shape), dtype=np.float16)
    # Random bit patterns (finite ones: exponent never all ones) give LZ4 nothing to match: stored raw.
    bits = rng.integers(0, 1 << 16, (n, 1, *shape), dtype=np.uint16) & np.uint16(0xBFFF)
    noise = bits.view(np.float16)
    if kind == "noise":
        return noise
    # Zero background in the first half along D, "tissue" in the rest: whole blocks of each.
    inside = np.arange(shape[0])[:, None, None] >= shape[0] // 2
    return np.where(inside, noise, np.float16(0))


def _write(path, images, block, **layout):
    with h5py.File(path, "w") as f:
        chunks = layout.pop("chunks", (1, 1, *images.shape[2:]))
        f.create_dataset("images", data=images, chunks=chunks, maxshape=(None, *images.shape[1:]), **layout)
        if block is not None:
            del f["images"]
            f.create_dataset(
                "images", data=images, chunks=chunks, maxshape=(None, *images.shape[1:]), **hdf5plugin.LZ4(nbytes=block)
            )


@pytest.mark.parametrize(("shape", "block", "kind"), CASES)
def test_decode_equals_h5py(tmp_path, shape, block, kind):
    images = _volumes(shape, kind)
    _write(tmp_path / "s.h5", images, block)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        dset = f["images"]
        assert whole_volume_lz4(dset)
        reader = ChunkReader(dset, "s.h5")
        for i in range(len(images)):
            expected = dset[i, 0]
            assert expected.tobytes() == images[i, 0].tobytes()
            out = np.full(shape, np.nan, dtype=np.float16)
            reader.read_into(i, out)
            assert out.tobytes() == expected.tobytes()
            _, stored = dset.id.read_direct_chunk((i, 0, 0, 0, 0))
            again = np.empty(shape, dtype=np.float16)
            decode_lz4_chunk(stored, again)
            assert again.tobytes() == expected.tobytes()


def test_raw_blocks_really_occur(tmp_path):
    """The cases above cover both block kinds: noise is stored raw, background compresses."""
    shape = (16, 20, 12)
    _write(tmp_path / "s.h5", _volumes(shape, "brain"), 1000)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        _, stored = f["images"].id.read_direct_chunk((0, 0, 0, 0, 0))
    sizes, pos, total = [], 12, int.from_bytes(stored[:8], "big")
    while pos < len(stored):
        size = int.from_bytes(stored[pos : pos + 4], "big")
        sizes.append(size)
        pos += 4 + size
    assert total == np.prod(shape) * 2 and len(sizes) == -(-total // 1000)
    assert 1000 in sizes and min(sizes) < 500


def test_other_layouts_fall_back_to_h5py(tmp_path):
    images = _volumes((8, 9, 10), "brain", n=2)
    layouts = {
        "gzip": {"compression": "gzip"},
        "none": {},
        "half-volume chunks": {"chunks": (1, 1, 4, 9, 10), **hdf5plugin.LZ4()},
    }
    for name, layout in layouts.items():
        path = tmp_path / f"{name}.h5"
        _write(path, images, None, **layout)
        with h5py.File(path, "r") as f:
            reader = ChunkReader(f["images"], name)
            assert not reader.fast
            out = np.empty((8, 9, 10), dtype=np.float16)
            reader.read_into(1, out)
            assert out.tobytes() == images[1, 0].tobytes()


def test_chunk_written_without_the_filter_is_read_by_hdf5(tmp_path):
    images = _volumes((6, 6, 6), "noise", n=2)
    _write(tmp_path / "s.h5", images, 0)
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        # filter_mask 1: HDF5 records that the LZ4 filter was skipped for this chunk.
        f["images"].id.write_direct_chunk((1, 0, 0, 0, 0), images[0].tobytes(), filter_mask=1)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        out = np.empty((6, 6, 6), dtype=np.float16)
        ChunkReader(f["images"], "s.h5").read_into(1, out)
        assert out.tobytes() == images[0, 0].tobytes()


def test_bad_chunks_raise_shard_errors_naming_where():
    out = np.empty(10, dtype=np.float16)
    with pytest.raises(ShardError, match="vol: LZ4 chunk of 8 bytes"):
        decode_lz4_chunk((8).to_bytes(8, "big") + (8).to_bytes(4, "big"), out, "vol")
    header = (20).to_bytes(8, "big") + (20).to_bytes(4, "big")
    with pytest.raises(ShardError, match="truncated"):
        decode_lz4_chunk(header + (20).to_bytes(4, "big") + bytes(5), out, "vol")
    with pytest.raises(ShardError, match="corrupt LZ4 block"):
        decode_lz4_chunk(header + (6).to_bytes(4, "big") + b"\xff" * 6, out, "vol")
