import json

import pytest
import torch

from hpcdiff import checkpoint


def _state(seed: int) -> tuple[dict, str]:
    g = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    ema = {"w": model["w"] * 0.5, "b": model["b"] * 0.5}
    opt = torch.optim.AdamW([torch.nn.Parameter(model["w"].clone())])
    return {"model": model, "ema": ema, "optimizer": opt.state_dict(), "step": seed}, checkpoint.weights_sha256(
        model, ema
    )


def test_save_load_round_trip_restores_every_field(tmp_path):
    state, digest = _state(7)
    info = checkpoint.save(tmp_path, 7, state, digest)
    assert info.valid and info.weights_sha256 == digest
    assert (tmp_path / "LATEST").read_text().strip() == "step-000000007"
    back = checkpoint.load(info)
    assert back["step"] == 7
    for k in ("w", "b"):
        assert torch.equal(back["model"][k], state["model"][k])
        assert torch.equal(back["ema"][k], state["ema"][k])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def test_weights_digest_takes_0d_buffers():
    bn = torch.nn.BatchNorm1d(3)  # num_batches_tracked is a 0-d int64 tensor
    same = checkpoint.weights_sha256(bn.state_dict())
    assert same == checkpoint.weights_sha256(torch.nn.BatchNorm1d(3).state_dict())
    bn.num_batches_tracked += 1
    assert checkpoint.weights_sha256(bn.state_dict()) != same


def test_weights_digest_changes_with_one_bit_and_not_with_order():
    a = {"x": torch.zeros(3), "y": torch.ones(2)}
    b = {"y": torch.ones(2), "x": torch.zeros(3)}
    assert checkpoint.weights_sha256(a) == checkpoint.weights_sha256(b)
    c = {"x": torch.tensor([0.0, 0.0, 1e-45]), "y": torch.ones(2)}
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256(c)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage, caplog):
    for step in (1, 2):
        state, digest = _state(step)
        checkpoint.save(tmp_path, step, state, digest)
    newest = tmp_path / "step-000000002"
    data = (newest / "state.pt").read_bytes()
    if damage == "truncate":
        (newest / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        (newest / "state.pt").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        (newest / "COMPLETE.json").unlink()
    with caplog.at_level("WARNING"):
        info = checkpoint.latest_valid(tmp_path)
    assert info is not None and info.step == 1
    assert "skipping checkpoint" in caplog.text and "step-000000002" in caplog.text


def test_retention_keeps_last_k_and_every_nth_and_never_the_only_valid(tmp_path):
    for step in range(1, 8):
        state, digest = _state(step)
        checkpoint.save(tmp_path, step, state, digest)
        checkpoint.apply_retention(tmp_path, keep_last=2, keep_every=3)
    steps = sorted(i.step for i in checkpoint.list_checkpoints(tmp_path))
    assert steps == [3, 6, 7]
    # Corrupt the newest (same size, one bit): retention must not delete the last *valid* ones in its favour.
    state_file = tmp_path / "step-000000007" / "state.pt"
    data = state_file.read_bytes()
    state_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    checkpoint.apply_retention(tmp_path, keep_last=1)
    assert checkpoint.latest_valid(tmp_path).step == 6
    assert (tmp_path / "step-000000006").is_dir()


def test_an_interrupted_write_leaves_no_checkpoint(tmp_path):
    state, digest = _state(1)
    checkpoint.save(tmp_path, 1, state, digest)
    # What a kill mid-save leaves: a temporary folder with a partial file and no marker.
    tmp = tmp_path / ".step-000000002.tmp-123-456"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"partial")
    assert [i.step for i in checkpoint.list_checkpoints(tmp_path)] == [1]
    state2, digest2 = _state(2)
    checkpoint.save(tmp_path, 2, state2, digest2)
    checkpoint.apply_retention(tmp_path, keep_last=5)
    assert not tmp.exists()
    meta = json.loads((tmp_path / "step-000000002" / "COMPLETE.json").read_text())
    assert meta["weights_sha256"] == digest2


def test_saver_writes_the_state_as_it_was_when_save_returned(tmp_path):
    """Training changes the weights in place right after save(): the background write must not see that."""
    state, digest = _state(3)
    before = {k: v.clone() for k, v in state["model"].items()}
    saver = checkpoint.Saver(tmp_path, keep_last=2)
    assert saver.save(3, state, digest) is None  # nothing was in flight
    for t in state["model"].values():
        t.add_(1.0)  # the next optimizer step
    saved = saver.wait()
    saver.close()
    assert saved.info.valid and saved.info.step == 3 and saved.stall_s >= 0 and saved.write_s > 0
    back = checkpoint.load(saved.info)
    for k, v in before.items():
        assert torch.equal(back["model"][k], v)
    assert (tmp_path / "LATEST").read_text().strip() == "step-000000003"


def test_saver_polls_without_blocking_and_prunes_after_verifying(tmp_path):
    saver = checkpoint.Saver(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        state, digest = _state(step)
        saver.save(step, state, digest)
    last = saver.wait()
    assert saver.poll() is None  # nothing in flight any more
    saver.close()
    assert last.info.step == 3
    assert [i.step for i in checkpoint.list_checkpoints(tmp_path)] == [3]


def test_a_failed_background_write_is_raised_and_leaves_nothing(tmp_path):
    saver = checkpoint.Saver(tmp_path, keep_last=2)
    state, digest = _state(1)
    saver.save(1, state, digest)
    saver.wait()
    bad = {**state, "hook": lambda: None}  # torch.save cannot pickle it: the write fails part-way
    saver.save(2, bad, digest)
    with pytest.raises(Exception, match="pickle"):
        saver.wait()
    saver.close()
    assert [i.step for i in checkpoint.list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".step-*"))


def test_status_check_is_shallow_and_loading_check_is_deep(tmp_path):
    for step in (1, 2):
        state, digest = _state(step)
        checkpoint.save(tmp_path, step, state, digest)
    newest = tmp_path / "step-000000002" / "state.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, other bytes
    assert checkpoint.latest_valid(tmp_path, deep=False).step == 2  # marker and size: what status shows
    assert checkpoint.latest_valid(tmp_path).step == 1


def test_one_rank_decides_and_the_others_check_by_marker(tmp_path):
    for step in (1, 2):
        state, digest = _state(step)
        checkpoint.save(tmp_path, step, state, digest)
    decision = checkpoint.decide(tmp_path)
    assert decision.name == "step-000000002" and decision.weights_sha256 == _state(2)[1]
    assert checkpoint.taken(tmp_path, decision).step == 2
    # A rank that sees another file under that name (a replaced checkpoint, a stale file system) refuses it.
    marker = tmp_path / decision.name / "COMPLETE.json"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "sha256": "f" * 64}))
    with pytest.raises(checkpoint.CheckpointError, match=r"step-000000002.*sha256 ffffffffffff.*deciding rank"):
        checkpoint.taken(tmp_path, decision)
    assert checkpoint.decide(tmp_path / "none") is None


def test_the_read_back_reads_the_device_not_the_page_cache(tmp_path):
    """The checksum of a just-written (so fully cached) checkpoint is computed over bytes fetched from the device."""
    import hashlib
    import os

    def device_reads() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))

    path = tmp_path / "state.pt"
    data = os.urandom((3 << 20) + 123)  # several blocks and a short last one
    assert checkpoint._write_and_hash(path, memoryview(data)) == hashlib.sha256(data).hexdigest()
    before = device_reads()
    assert checkpoint.file_sha256(path) == hashlib.sha256(data).hexdigest()
    cached = device_reads() - before
    before = device_reads()
    assert checkpoint.file_sha256(path, direct=True) == hashlib.sha256(data).hexdigest()
    fetched = device_reads() - before
    if cached >= len(data):
        pytest.skip(f"{tmp_path}: even a plain read goes to the device here, so the test cannot tell them apart")
    assert fetched >= len(data), f"O_DIRECT read-back fetched {fetched} bytes from the device for {len(data)}"


def test_mmap_load_gives_the_same_tensors(tmp_path):
    state, digest = _state(3)
    info = checkpoint.save(tmp_path, 3, state, digest)
    back = checkpoint.load(info, mmap=True)
    assert torch.equal(back["ema"]["w"], state["ema"]["w"]) and back["step"] == 3
