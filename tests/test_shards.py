import json
import multiprocessing as mp
import pickle
import shutil
import subprocess

import numpy as np
import pytest

from hpcdiff.data.shards import (
    MANIFEST,
    SUBJECTS_TABLE,
    ShardInfo,
    ShardSet,
    file_sha256,
    shard_name,
    verified_shard,
    write_manifest,
    write_shard,
)
from hpcdiff.errors import ShardError

SHAPE = (6, 7, 5)


def _subjects(ids, ages):
    return {
        "id": ids,
        "session": [""] * len(ids),
        "source_path": [f"sub-{i}/anat/sub-{i}_T1w.nii.gz" for i in ids],
        "source_sha256": ["0" * 64] * len(ids),
        "age": ages,
        "sex": ["F" if j % 2 else "M" for j in range(len(ids))],
    }


def _make(root, counts=(3, 2, 4)):
    """A shard directory whose voxel values encode the global index, so reads can be checked exactly."""
    infos, start = [], 0
    for s, k in enumerate(counts):
        idx = np.arange(start, start + k)
        images = np.broadcast_to(idx[:, None, None, None, None], (k, 1, *SHAPE)).astype(np.float16)
        images = images + np.linspace(0, 0.5, np.prod(SHAPE)).reshape(SHAPE).astype(np.float16)
        infos.append(write_shard(root / shard_name(s), images, _subjects([f"{i:03d}" for i in idx], idx * 1.5)))
        start += k
    every = np.arange(start)
    write_manifest(
        root,
        shape=SHAPE,
        spacing=(2.0, 2.0, 2.0),
        affine=np.eye(4),
        covariates={"age": {"kind": "continuous"}, "sex": {"kind": "categorical", "levels": ["F", "M"]}},
        shards=infos,
        provenance={"test": True},
        subjects=_subjects([f"{i:03d}" for i in every], every * 1.5),
    )
    return infos


def test_write_read_round_trip_in_global_order(tmp_path):
    infos = _make(tmp_path)
    shards = ShardSet.open(tmp_path, verify=True)
    assert shards.num_subjects == 9 and shards.shape == SHAPE
    assert [i.num_subjects for i in infos] == [3, 2, 4]
    table = shards.subjects()
    assert list(table["id"]) == [f"{i:03d}" for i in range(9)]
    np.testing.assert_array_equal(table["age"], np.arange(9) * 1.5)
    assert table["age"].dtype == np.float64 and table["sex"][0] == "M"
    for i in range(9):
        vol = shards.read(i)
        assert vol.shape == (1, *SHAPE) and vol.dtype == np.float32
        assert vol.min() == i
    many = shards.read_many([8, 0, 4])
    np.testing.assert_array_equal(many[:, 0, 0, 0, 0], [8, 0, 4])
    assert shards.locate(4) == (tmp_path / "shard-00001.h5", 1)
    with pytest.raises(IndexError):
        shards.read(9)
    shards.close()


def test_files_are_byte_identical_for_identical_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert _make(a) == _make(b)
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    _make(tmp_path)
    names = [MANIFEST, *(shard_name(i) for i in range(3)), SUBJECTS_TABLE]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    # A failing write leaves neither the final name nor a temporary file behind.
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.h5", np.zeros((2, 1, *SHAPE)), {"id": ["x"]})
    assert not any(p.name.endswith(".tmp") or p.name == "bad.h5" for p in tmp_path.iterdir())


def test_verified_shard_rejects_truncated_and_wrong_count(tmp_path):
    infos = _make(tmp_path)
    path = tmp_path / shard_name(2)
    assert verified_shard(path, expected=4) == infos[2]
    assert verified_shard(path, expected=5) is None
    assert verified_shard(tmp_path / "missing.h5") is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert verified_shard(path) is None
    # Flip bytes inside the compressed chunks: the file still opens but a chunk fails to decode.
    path.write_bytes(data[:2048] + bytes(len(data) - 4096) + data[-2048:])
    assert verified_shard(path) is None


def test_empty_shard_is_valid(tmp_path):
    info = write_shard(tmp_path / "s.h5", np.zeros((0, 1, *SHAPE)), _subjects([], []))
    assert info.num_subjects == 0
    assert verified_shard(tmp_path / "s.h5", expected=0) == info


def test_shardset_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ShardError, match=r"no manifest\.json.*hpcdiff ingest"):
        ShardSet.open(tmp_path)
    _make(tmp_path)
    path = tmp_path / shard_name(1)
    original = path.read_bytes()
    path.write_bytes(original[:-100] + bytes(100))
    with pytest.raises(ShardError, match=r"shard-00001\.h5: checksum mismatch.*rerun"):
        ShardSet.open(tmp_path, verify=True)
    path.write_bytes(original[:1000])
    with pytest.raises(ShardError, match=r"shard-00001\.h5: cannot open.*truncated"):
        ShardSet.open(tmp_path).read(3)
    path.write_bytes(original)
    text = (tmp_path / MANIFEST).read_text()
    manifest = json.loads(text)
    manifest["shape"] = [6, 7, 6]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard-00000\.h5: volumes have shape \(6, 7, 5\), manifest says"):
        ShardSet.open(tmp_path).read(0)
    (tmp_path / MANIFEST).write_text(text)
    path.unlink()
    with pytest.raises(ShardError, match=r"shard-00001\.h5: listed in .* but missing"):
        ShardSet.open(tmp_path, verify=True)


def _read_in_child(shards, queue):
    queue.put(float(shards.read(7).min()))


def test_shardset_pickles_and_reopens_after_fork(tmp_path):
    _make(tmp_path)
    shards = ShardSet.open(tmp_path)
    assert shards.read(0).min() == 0  # parent holds an open handle now
    clone = pickle.loads(pickle.dumps(shards))
    assert clone.read(5).min() == 5
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(shards, queue))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and queue.get(timeout=5) == 7.0
    assert shards.read(8).min() == 8  # the parent's handles still work after the child closed its copies


def test_h5dump_reads_a_shard(tmp_path):
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump not installed (apt-get install hdf5-tools)")
    _make(tmp_path)
    out = subprocess.run(
        ["h5dump", "-H", str(tmp_path / shard_name(0))], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert 'DATASET "images"' in out
    assert "( 3, 1, 6, 7, 5 )" in out
    assert 'DATASET "id"' in out and 'ATTRIBUTE "complete"' in out
    digest = file_sha256(tmp_path / shard_name(0))
    assert digest == json.loads((tmp_path / MANIFEST).read_text())["shards"][0]["sha256"]


def test_subjects_table_comes_from_one_file_and_reads_open_few_shards(tmp_path):
    _make(tmp_path, counts=(3, 2, 4, 1, 2))
    columns = json.loads((tmp_path / SUBJECTS_TABLE).read_text())["columns"]
    assert columns["shard"] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4] and columns["row"][:4] == [0, 1, 2, 0]
    shards = ShardSet.open(tmp_path, max_open=2)
    table = shards.subjects()
    assert shards.open_files == 0  # the table and the covariates come without opening a shard
    assert list(table["id"]) == [f"{i:03d}" for i in range(12)] and "shard" not in table
    assert table["age"].dtype == np.float64 and table["sex"].dtype.kind == "U"
    for i in (0, 4, 6, 9, 11, 0):
        assert shards.read(i).min() == i
        assert shards.open_files <= 2  # least recently used handles are closed
    np.testing.assert_array_equal(shards.read_many(range(12))[:, 0, 0, 0, 0], np.arange(12))
    assert shards.open_files <= 2


def test_subjects_table_is_checked_against_the_manifest(tmp_path):
    _make(tmp_path)
    path = tmp_path / SUBJECTS_TABLE
    path.write_text(path.read_text().replace('"000"', '"999"'))
    with pytest.raises(ShardError, match=r"subjects\.json: checksum differs.*rerun"):
        ShardSet.open(tmp_path).subjects()
    with pytest.raises(ValueError, match=r"subjects\['id'\] has 2 rows, the shards hold 9"):
        write_manifest(tmp_path, **_manifest_args(), subjects={"id": ["a", "b"]})
    bad_rows = {"id": [str(i) for i in range(9)], "row": list(range(9))}
    with pytest.raises(ValueError, match=r"subjects\['row'\] disagrees"):
        write_manifest(tmp_path, **_manifest_args(), subjects=bad_rows)


def _manifest_args():
    infos = [ShardInfo(shard_name(i), k, "0" * 64) for i, k in enumerate((3, 2, 4))]
    return {
        "shape": SHAPE,
        "spacing": (1, 1, 1),
        "affine": np.eye(4),
        "covariates": {},
        "shards": infos,
        "provenance": {},
    }


def test_data_digest_follows_ids_checksums_and_order_not_paths(tmp_path):
    ids = [f"{i:03d}" for i in range(9)]

    def digest(**changes):
        table = {**_subjects(ids, np.arange(9.0)), **changes}
        return write_manifest(tmp_path, **_manifest_args(), subjects=table)["subjects"]["data_sha256"]

    base = digest()
    assert digest(source_path=["moved"] * 9) == base
    assert digest(age=np.arange(9.0) + 1) == base
    assert digest(id=ids[::-1]) != base
    assert digest(source_sha256=["1" * 64] * 9) != base
