"""Whole-volume chunks read at the speed of the disk: HDF5's LZ4 filter decoded here instead of inside HDF5.

HDF5's chunk path decodes one chunk at a time on one thread, behind h5py's global lock, at a fraction of what
the disk delivers. HDF5 says where a chunk's stored bytes lie; they are read with ``preadv`` on the file's own
descriptor, outside that lock (``read_direct_chunk`` when there is no descriptor), and the LZ4 filter's layout is
simple (filter 32004 of hdf5plugin, src/LZ4/H5Zlz4.c), so this module decodes it with the
``lz4`` binding, which releases the GIL: several volumes decode on several threads. A chunk stored as one raw
block (noisy volumes do not compress) is read by ``preadv`` straight into the caller's array, with no copy in
between. Anything else (another filter, a filter the writer skipped, a chunk that is not one whole volume) goes
through h5py as before, so the shard files stay plain HDF5.

Stored chunk layout (all big-endian): 8 bytes uncompressed total size, 4 bytes block size, then per block 4 bytes
compressed size and the block; a block whose compressed size equals its uncompressed length is stored raw,
otherwise it is a raw LZ4 block (no frame).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading

import h5py
import lz4.block
import numpy as np

from hpcdiff.errors import ShardError

LZ4_FILTER = 32004
_HEADER = struct.Struct(">QI")
_BLOCK = struct.Struct(">I")
_RAW_ONE_BLOCK = _HEADER.size + _BLOCK.size  # header and block size of a chunk stored as one raw block


def _lz4_decompress_safe() -> ctypes._CFuncPtr | None:
    """liblz4's ``LZ4_decompress_safe`` as built into the ``lz4`` binding: it decodes straight into our array.

    ``lz4.block.decompress`` returns a new bytes object that then has to be copied; through ctypes (which drops
    the GIL during the call) the block lands where it belongs. None when the binding does not export it.
    """
    try:
        fn = ctypes.CDLL(lz4.block._block.__file__).LZ4_decompress_safe
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_DECOMPRESS_SAFE = _lz4_decompress_safe()
_SCRATCH = threading.local()  # one stored-chunk buffer per thread, reused: fresh pages cost a page fault each


def _decompress_into(block: memoryview, dest: np.ndarray, where: str) -> None:
    """Decode one raw LZ4 block into ``dest`` (uint8, exactly the block's uncompressed length)."""
    if _DECOMPRESS_SAFE is not None and len(block):
        src = np.frombuffer(block, dtype=np.uint8)
        got = _DECOMPRESS_SAFE(src.ctypes.data, dest.ctypes.data, len(block), dest.nbytes)
        if got != dest.nbytes:
            raise ShardError(f"{where}: corrupt LZ4 block (decoded {got} bytes, expected {dest.nbytes})")
        return
    try:
        decoded = lz4.block.decompress(block, uncompressed_size=dest.nbytes)
    except lz4.block.LZ4BlockError as e:
        raise ShardError(f"{where}: corrupt LZ4 block: {e}") from e
    if len(decoded) != dest.nbytes:
        raise ShardError(f"{where}: LZ4 block decoded to {len(decoded)} bytes, expected {dest.nbytes}")
    dest[:] = np.frombuffer(decoded, dtype=np.uint8)


def decode_lz4_chunk(data: bytes | memoryview, out: np.ndarray, where: str = "chunk") -> None:
    """Decode one stored LZ4-filter chunk into ``out`` (C-contiguous, ``out.nbytes`` = the chunk's size).

    Raises:
        ShardError: the bytes do not describe a chunk of ``out.nbytes`` bytes (naming ``where``).
    """
    view = memoryview(data).cast("B")
    dest = out.reshape(-1).view(np.uint8)
    if len(view) < _HEADER.size:
        raise ShardError(f"{where}: {len(view)} stored bytes, too short for an LZ4 chunk header")
    total, block_size = _HEADER.unpack_from(view, 0)
    if total != dest.nbytes or (total and block_size == 0):
        raise ShardError(f"{where}: LZ4 chunk of {total} bytes (block size {block_size}), expected {dest.nbytes}")
    pos, done = _HEADER.size, 0
    while done < total:
        n = min(block_size, total - done)
        if pos + _BLOCK.size > len(view):
            raise ShardError(f"{where}: LZ4 chunk truncated at byte {pos} of {len(view)}")
        (size,) = _BLOCK.unpack_from(view, pos)
        pos += _BLOCK.size
        block = view[pos : pos + size]
        if len(block) != size:
            raise ShardError(f"{where}: LZ4 block of {size} bytes truncated at byte {pos} of {len(view)}")
        if size == n:
            dest[done : done + n] = np.frombuffer(block, dtype=np.uint8)
        else:
            _decompress_into(block, dest[done : done + n], f"{where} at byte {pos}")
        pos += size
        done += n


def whole_volume_lz4(dset: h5py.Dataset) -> bool:
    """True when ``dset`` (k, 1, D, H, W) stores one chunk per volume through the LZ4 filter alone."""
    chunks = dset.chunks
    if chunks is None or tuple(chunks) != (1, 1, *dset.shape[2:]):
        return False
    plist = dset.id.get_create_plist()
    return plist.get_nfilters() == 1 and plist.get_filter(0)[0] == LZ4_FILTER


class ChunkReader:
    """Reads volumes of one shard's ``images`` dataset through the fast path, or through h5py when it cannot.

    One reader serves several threads: HDF5 calls go through h5py (which serialises them), the file reads and
    the LZ4 decoding run outside every lock.
    """

    def __init__(self, dset: h5py.Dataset, path: str) -> None:
        self.dset = dset
        self.path = path
        self.fast = whole_volume_lz4(dset)
        # The sec2 driver's descriptor: reading it ourselves needs no second open of the file.
        self._fd = int(dset.file.id.get_vfd_handle()) if self.fast and dset.file.driver == "sec2" else -1

    def read_into(self, row: int, out: np.ndarray) -> None:
        """Decode volume ``row`` into ``out`` (float16, shape (D, H, W), C-contiguous)."""
        if not self.fast or not out.flags.c_contiguous:
            self.dset.read_direct(out, source_sel=np.s_[row, 0])
            return
        coord = (row, 0, 0, 0, 0)
        info = self.dset.id.get_chunk_info_by_coord(coord)
        if info.byte_offset is None or info.filter_mask != 0:
            # Never written (fill value) or stored without the filter: HDF5 knows what to do.
            self.dset.read_direct(out, source_sel=np.s_[row, 0])
            return
        where = f"{self.path}: images[{row}]"
        if self._fd >= 0 and info.size == _RAW_ONE_BLOCK + out.nbytes and self._read_raw(info.byte_offset, out):
            return
        scratch = getattr(_SCRATCH, "buffer", None)
        if scratch is None or scratch.nbytes < info.size:
            scratch = _SCRATCH.buffer = np.empty(info.size, dtype=np.uint8)
        stored = scratch[: info.size]
        if self._fd >= 0:
            # Our own pread, outside h5py's global lock: threads read (and wait on the disk) at the same time.
            got = os.preadv(self._fd, [stored], info.byte_offset)
            if got != info.size:
                raise ShardError(f"{where}: short read of a chunk at byte {info.byte_offset} ({got} bytes)")
            data: bytes | memoryview | np.ndarray = stored
        else:
            _, data = self.dset.id.read_direct_chunk(coord, out=stored)
        decode_lz4_chunk(data, out, where)

    def _read_raw(self, offset: int, out: np.ndarray) -> bool:
        """Read a chunk stored as one raw block straight into ``out``; False if the header says otherwise."""
        header = bytearray(_RAW_ONE_BLOCK)
        dest = out.reshape(-1).view(np.uint8)
        got = os.preadv(self._fd, [header, dest], offset)
        if got != len(header) + dest.nbytes:
            raise ShardError(f"{self.path}: short read of a chunk at byte {offset} ({got} bytes)")
        total, block_size = _HEADER.unpack_from(header, 0)
        (size,) = _BLOCK.unpack_from(header, _HEADER.size)
        return total == dest.nbytes and block_size >= total and size == total
