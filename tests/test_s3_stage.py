"""S3 staging against a real HTTP S3 endpoint (moto's server on loopback): checksums, skipping, resume, atomicity.

Requests are counted on the client's own event hooks, so "nothing re-sent" is measured at the wire, not taken from
the report under test. Fake credentials are set for every test: real AWS is never contacted.
"""

from __future__ import annotations

import collections
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from hpcdiff.errors import DataError, UsageError
from hpcdiff.launch.aws import s3stage
from tests import harness

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

PART = s3stage.MIN_PART  # the smallest part S3 accepts; a 6 MiB file then goes up in two parts


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch, tmp_path):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


class CountingClient:
    """A boto3 S3 client whose API calls are counted by operation name (PutObject, UploadPart, ...)."""

    def __init__(self, endpoint: str):
        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.calls: collections.Counter[str] = collections.Counter()
        self.client.meta.events.register("before-call.s3.*", self._count)

    def _count(self, model, **kwargs):
        self.calls[model.name] += 1

    def reset(self) -> None:
        self.calls.clear()

    @property
    def uploads(self) -> int:
        return self.calls["PutObject"] + self.calls["CreateMultipartUpload"]


@pytest.fixture()
def s3(endpoint):
    counted = CountingClient(endpoint)
    bucket = f"hpcdiff-{uuid.uuid4().hex[:12]}"
    counted.client.create_bucket(Bucket=bucket)
    counted.bucket = bucket
    counted.reset()
    return counted


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "manifest.json": b'{"format": 1}\n',
        "empty.txt": b"",
        "shards/shard-00000.h5": os.urandom(3000),
        "shards/shard-00001.h5": os.urandom(1 + PART + PART // 5),  # multipart: two parts
        "a dir/file with 'quotes' & spaces.tsv": b"id\tage\n1\t40\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def stage(s3, src: Path, prefix: str = "cohort", **kw):
    return s3stage.stage(
        src, f"s3://{s3.bucket}/{prefix}", client=s3.client, multipart_threshold=PART, multipart_chunksize=PART, **kw
    )


def fetch(s3, dst: Path, prefix: str = "cohort", **kw):
    return s3stage.fetch(
        f"s3://{s3.bucket}/{prefix}", dst, client=s3.client, multipart_threshold=PART, multipart_chunksize=PART, **kw
    )


def test_round_trip_keeps_every_byte_and_stores_checksums(s3, tmp_path):
    files = make_tree(tmp_path / "src")
    report = stage(s3, tmp_path / "src")
    assert sorted(report.sent) == sorted(files)
    assert s3.calls["CreateMultipartUpload"] == 1 and s3.calls["UploadPart"] == 2
    for rel, data in files.items():
        head = s3.client.head_object(Bucket=s3.bucket, Key=f"cohort/{rel}")
        assert head["Metadata"][s3stage.SHA256_KEY] == hashlib.sha256(data).hexdigest()

    back = fetch(s3, tmp_path / "dst")
    assert sorted(back.sent) == sorted(files) and back.unverified == []
    assert digests(tmp_path / "dst") == digests(tmp_path / "src")


def test_nothing_already_there_is_sent_again(s3, tmp_path):
    make_tree(tmp_path / "src")
    stage(s3, tmp_path / "src")
    s3.reset()
    again = stage(s3, tmp_path / "src")
    assert again.sent == [] and s3.uploads == 0 and s3.calls["UploadPart"] == 0

    (tmp_path / "src" / "manifest.json").write_bytes(b'{"format": 2}\n')  # same size, new content
    changed = stage(s3, tmp_path / "src")
    assert changed.sent == ["manifest.json"] and s3.uploads == 1


def test_interrupted_stage_resumes_with_only_the_missing_files(s3, tmp_path):
    files = make_tree(tmp_path / "src")
    done: list[str] = []

    def crash_after_two(rel: str) -> None:
        done.append(rel)
        if len(done) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    with pytest.raises(KeyboardInterrupt):
        stage(s3, tmp_path / "src", on_file_done=crash_after_two)
    s3.reset()
    resumed = stage(s3, tmp_path / "src")
    assert sorted(resumed.skipped) == sorted(done)
    assert sorted(resumed.sent) == sorted(set(files) - set(done))
    assert s3.uploads == len(files) - 2
    fetch(s3, tmp_path / "dst")
    assert digests(tmp_path / "dst") == digests(tmp_path / "src")


def test_unfinished_multipart_upload_is_aborted_and_redone(s3, tmp_path):
    make_tree(tmp_path / "src")
    key = "cohort/shards/shard-00001.h5"
    upload = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=key)
    s3.client.upload_part(Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * PART)
    report = stage(s3, tmp_path / "src")
    assert report.aborted_uploads == 1
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    fetch(s3, tmp_path / "dst")
    assert digests(tmp_path / "dst") == digests(tmp_path / "src")


def test_fetch_skips_identical_files_and_replaces_changed_ones(s3, tmp_path):
    make_tree(tmp_path / "src")
    stage(s3, tmp_path / "src")
    fetch(s3, tmp_path / "dst")
    s3.reset()
    assert fetch(s3, tmp_path / "dst").sent == [] and s3.calls["GetObject"] == 0
    (tmp_path / "dst" / "shards" / "shard-00000.h5").write_bytes(b"corrupted locally")
    assert fetch(s3, tmp_path / "dst").sent == ["shards/shard-00000.h5"]
    assert digests(tmp_path / "dst") == digests(tmp_path / "src")


def test_fetch_refuses_data_that_does_not_match_its_checksum(s3, tmp_path):
    make_tree(tmp_path / "src")
    stage(s3, tmp_path / "src")
    key = "cohort/manifest.json"
    old = s3.client.head_object(Bucket=s3.bucket, Key=key)["Metadata"]
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b'{"format": 9}\n', Metadata=old)  # bit rot, say
    with pytest.raises(DataError, match="manifest.json"):
        fetch(s3, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert not (dst / "manifest.json").exists()
    assert [p.name for p in dst.rglob("*.part")] == []


def test_fetch_refuses_keys_that_escape_the_directory(s3, tmp_path):
    s3.client.put_object(Bucket=s3.bucket, Key="cohort/../../outside.txt", Body=b"x")
    with pytest.raises(DataError, match="outside.txt"):
        fetch(s3, tmp_path / "dst")
    assert not (tmp_path / "outside.txt").exists()


def test_objects_without_a_checksum_are_fetched_and_reported_unverified(s3, tmp_path):
    s3.client.put_object(Bucket=s3.bucket, Key="cohort/from-elsewhere.txt", Body=b"hello")
    report = fetch(s3, tmp_path / "dst")
    assert report.unverified == ["from-elsewhere.txt"]
    assert (tmp_path / "dst" / "from-elsewhere.txt").read_bytes() == b"hello"


@pytest.mark.parametrize("url", ["my-bucket/prefix", "s3://", "s3:///prefix", "https://my-bucket.s3.amazonaws.com"])
def test_bad_urls_are_usage_errors(url):
    with pytest.raises(UsageError, match="s3://BUCKET"):
        s3stage.parse_s3_url(url)


def test_cli_stage_and_fetch_through_an_endpoint_url(s3, endpoint, tmp_path):
    make_tree(tmp_path / "src dir")
    url = f"s3://{s3.bucket}/runs/one"
    up = harness.hpcdiff("cluster", "aws", "stage", tmp_path / "src dir", url, "--endpoint-url", endpoint)
    harness.assert_ok(up)
    assert "5 sent" in up.stdout
    again = harness.hpcdiff("cluster", "aws", "stage", tmp_path / "src dir", url, "--endpoint-url", endpoint)
    harness.assert_ok(again)
    assert "0 sent" in again.stdout and "5 already there" in again.stdout
    # AWS_ENDPOINT_URL works as well as the flag (the child inherits the fake credentials set above).
    down = harness.hpcdiff("cluster", "aws", "fetch", url, tmp_path / "dst", env={"AWS_ENDPOINT_URL": endpoint})
    harness.assert_ok(down)
    assert digests(tmp_path / "dst") == digests(tmp_path / "src dir")


def test_cli_missing_bucket_and_bad_url_exit_2(endpoint, tmp_path):
    (tmp_path / "f").write_text("x")
    missing = harness.hpcdiff(
        "cluster", "aws", "stage", tmp_path, "s3://no-such-bucket-hpcdiff/x", "--endpoint-url", endpoint
    )
    harness.assert_ok(missing, 2)
    assert "does not exist" in missing.stderr
    bad = harness.hpcdiff("cluster", "aws", "fetch", "no-scheme/x", tmp_path / "d", "--endpoint-url", endpoint)
    harness.assert_ok(bad, 2)
    assert "s3://BUCKET" in bad.stderr
