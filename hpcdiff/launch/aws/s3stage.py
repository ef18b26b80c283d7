"""Copy a directory to S3 and back, verified and resumable, so a cluster's FSx sees exactly the user's files.

Each object carries the sha256 of its file as metadata. An upload skips a file whose object already has the same
size and sha256, so a run cut short (a lost laptop connection, Ctrl-C) is finished by running it again; partial
multipart uploads it left under the prefix are aborted first (S3 would otherwise bill their parts forever). A
download verifies the sha256 and lands through a temporary name and a rename: a file either is complete or absent.
One stage or fetch per prefix at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hpcdiff.atomic import file_sha256
from hpcdiff.errors import DataError, HpcdiffError, UsageError

SHA256_KEY = "sha256"  # object metadata key (sent as x-amz-meta-sha256)
MiB = 1024 * 1024
MIN_PART = 5 * MiB


@dataclass
class TransferReport:
    """What one stage or fetch did; ``sent`` lists the files that crossed the network."""

    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    aborted_uploads: int = 0
    unverified: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.sent)} sent ({self.bytes_sent} bytes), {len(self.skipped)} already there and identical"
        if self.aborted_uploads:
            text += f", {self.aborted_uploads} unfinished multipart upload(s) aborted"
        if self.unverified:
            text += f", {len(self.unverified)} without a stored sha256 (size checked only)"
        return text


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b/"); the prefix is empty or ends with '/'."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise UsageError(f"expected an S3 URL such as s3://BUCKET/PREFIX, got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_client(endpoint_url: str | None = None) -> Any:
    """An S3 client; ``endpoint_url`` (or AWS_ENDPOINT_URL) points it at an S3-compatible server."""
    try:
        import boto3
    except ImportError as e:
        raise UsageError("S3 staging needs boto3: pip install -e '.[aws]'") from e
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))


def _transfer_config(multipart_threshold: int, multipart_chunksize: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    if multipart_threshold < 1 or multipart_chunksize < MIN_PART:
        raise UsageError(
            f"multipart threshold must be >= 1 byte and part size >= {MIN_PART // MiB} MiB (S3's smallest part), "
            f"got {multipart_threshold} and {multipart_chunksize}"
        )
    return TransferConfig(
        multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize, max_concurrency=4
    )


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _errors() -> tuple[type[Exception], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def _explain(e: BaseException, url: str) -> HpcdiffError:
    """botocore's errors as hpcdiff errors that say how to fix them."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if not isinstance(e, ClientError) and isinstance(e.__cause__ or e.__context__, ClientError):
        e = e.__cause__ or e.__context__  # boto3's upload_file wraps the ClientError that says what went wrong
    if isinstance(e, NoCredentialsError):
        return UsageError(f"{url}: no AWS credentials; run 'aws configure' or set AWS_ACCESS_KEY_ID/SECRET")
    if isinstance(e, EndpointConnectionError):
        return UsageError(f"{url}: cannot reach the S3 endpoint ({e}); check --endpoint-url or AWS_ENDPOINT_URL")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return UsageError(f"{url}: the bucket does not exist; create it with 'aws s3 mb s3://BUCKET'")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return UsageError(f"{url}: access denied ({code}); check the credentials and the bucket policy")
    return HpcdiffError(f"{url}: {e}")


def abort_unfinished_uploads(client: Any, bucket: str, prefix: str) -> int:
    """Abort multipart uploads left under ``prefix`` by an interrupted run; returns how many."""
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted += 1
    return aborted


def stage(
    local_dir: str | Path,
    s3_url: str,
    *,
    endpoint_url: str | None = None,
    client: Any | None = None,
    multipart_threshold: int = 64 * MiB,
    multipart_chunksize: int = 64 * MiB,
    on_file_done: Callable[[str], None] | None = None,
) -> TransferReport:
    """Upload every file under ``local_dir`` to ``s3_url``, skipping those already there and identical.

    Args:
        local_dir: the directory to upload (its relative paths become keys under the prefix).
        s3_url: ``s3://bucket/prefix``.
        endpoint_url: an S3-compatible endpoint instead of AWS's (also read from AWS_ENDPOINT_URL).
        client: a ready boto3 S3 client (overrides ``endpoint_url``).
        multipart_threshold: files from this size up are sent in parts (S3 needs parts >= 5 MiB).
        multipart_chunksize: the part size.
        on_file_done: called with each relative path once it is uploaded or skipped (progress; tests interrupt
            a run from it).
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory; stage uploads a directory's files")
    bucket, prefix = parse_s3_url(s3_url)
    client = client or make_client(endpoint_url)
    config = _transfer_config(multipart_threshold, multipart_chunksize)
    report = TransferReport()
    try:
        report.aborted_uploads = abort_unfinished_uploads(client, bucket, prefix)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            key = prefix + rel
            size = path.stat().st_size
            digest = file_sha256(path)
            head = _head(client, bucket, key)
            if head and head.get("ContentLength") == size and head.get("Metadata", {}).get(SHA256_KEY) == digest:
                report.skipped.append(rel)
            else:
                client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {SHA256_KEY: digest}}, Config=config)
                report.sent.append(rel)
                report.bytes_sent += size
            if on_file_done:
                on_file_done(rel)
    except _errors() as e:
        raise _explain(e, s3_url) from e
    return report


def _local_path(root: Path, rel: str, key: str) -> Path:
    """Where object ``key`` lands; a key that would escape ``root`` is refused."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", ".") for p in parts):
        raise DataError(f"object key {key!r} does not map to a path inside {root}; refusing to write it")
    return root.joinpath(*parts)


def fetch(
    s3_url: str,
    local_dir: str | Path,
    *,
    endpoint_url: str | None = None,
    client: Any | None = None,
    multipart_threshold: int = 64 * MiB,
    multipart_chunksize: int = 64 * MiB,
    on_file_done: Callable[[str], None] | None = None,
) -> TransferReport:
    """Download every object under ``s3_url`` into ``local_dir``, verified, skipping files already identical.

    Args are as for :func:`stage`. Raises DataError when a download does not match the sha256 stored with its
    object (the partial file is removed; the old local file, if any, is kept).
    """
    root = Path(local_dir)
    bucket, prefix = parse_s3_url(s3_url)
    client = client or make_client(endpoint_url)
    config = _transfer_config(multipart_threshold, multipart_chunksize)
    report = TransferReport()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue  # a "folder" placeholder made by the console
                rel = key[len(prefix) :]
                dest = _local_path(root, rel, key)
                head = _head(client, bucket, key) or {}
                want = head.get("Metadata", {}).get(SHA256_KEY)
                if dest.is_file() and dest.stat().st_size == obj["Size"] and (not want or file_sha256(dest) == want):
                    report.skipped.append(rel)
                else:
                    _download(client, bucket, key, dest, want, config)
                    report.sent.append(rel)
                    report.bytes_sent += obj["Size"]
                if not want:
                    report.unverified.append(rel)
                if on_file_done:
                    on_file_done(rel)
    except _errors() as e:
        raise _explain(e, s3_url) from e
    return report


def _download(client: Any, bucket: str, key: str, dest: Path, want: str | None, config: Any) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        client.download_file(bucket, key, str(tmp), Config=config)
        if want and file_sha256(tmp) != want:
            raise DataError(
                f"s3://{bucket}/{key}: the downloaded data does not match its stored sha256 {want}; "
                "the object was changed without updating its checksum: upload it again with 'hpcdiff cluster aws stage'"
            )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
