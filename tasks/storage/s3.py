"""Artifacts as objects in an S3-protocol bucket: what several hosts share instead of a filesystem.

Configured by URL (`SONGPIPE_ARTIFACT_URL=s3://bucket/prefix`); boto3 reads the endpoint
(`AWS_ENDPOINT_URL`, for MinIO, Ceph or a test stand-in), the region and the credentials from the
usual AWS_* variables and files. boto3 rather than fsspec/s3fs: the store needs four calls
(put/head/get/ranged get) whose errors it must tell apart (missing vs denied vs unreachable), which
botocore reports as typed codes; s3fs adds an async layer, a cache and aiobotocore version pins for
nothing we use, and maps several of those errors onto one generic OSError.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from tasks.contracts import ArtifactRef
from tasks.storage.base import (
    CHUNK_BYTES,
    ArtifactStream,
    ArtifactUnavailable,
    artifact_key,
    describe,
    make_ref,
    verified,
)

MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken", "InvalidToken"}


class ArtifactWriteError(RuntimeError):
    """The store refused or could not take an artifact's bytes."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix"); a one-line error for anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"artifact URL must look like s3://bucket/prefix, got {url!r}")
    if parsed.query or parsed.fragment:
        raise ValueError(f"artifact URL takes no query or fragment: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


class S3Store:
    def __init__(self, url: str, client=None):
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:  # lazily: a web process that never serves audio never builds one
            import boto3  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]

            # bounded waits: a partitioned host fails its call and the stage's record says why,
            # instead of hanging past its lease
            config = Config(connect_timeout=5, read_timeout=30,
                            retries={"max_attempts": 4, "mode": "standard"})
            self._client = boto3.session.Session().client("s3", config=config)
        return self._client

    def _key(self, sha256: str) -> str:
        key = artifact_key(sha256)
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe_root(self) -> str:
        return self.url

    def location(self, sha256: str) -> str:
        return artifact_key(sha256)

    def local_path(self, sha256: str) -> Path | None:
        return None

    def _unavailable(self, sha256: str, kind: str | None, exc: Exception) -> ArtifactUnavailable:
        code = _error_code(exc)
        if code in MISSING_CODES:
            reason = f"is missing from {self.url}"
        elif code in DENIED_CODES:
            reason = f"cannot be read from {self.url}: permission denied ({code})"
        else:
            reason = f"cannot be read from {self.url}: {type(exc).__name__}: {exc}"
        return ArtifactUnavailable(f"{describe(sha256, kind)} {reason}", sha256, kind)

    def put(self, data: bytes, kind: str) -> ArtifactRef:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        ref = make_ref(data, kind)
        if self.exists(ref.sha256):
            return ref
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(ref.sha256), Body=data,
                                   ContentType=ref.media_type, Metadata={"kind": kind})
        except (BotoCoreError, ClientError) as exc:
            raise ArtifactWriteError(f"{describe(ref.sha256, kind)} could not be written to {self.url}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return ref

    def get(self, sha256: str, kind: str | None = None) -> bytes:
        with self.open(sha256, kind=kind) as stream:
            return verified(stream.read(), sha256, kind)

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))
            return True
        except ClientError as exc:
            if _error_code(exc) in MISSING_CODES:
                return False
            raise self._unavailable(sha256, None, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(sha256, None, exc) from exc

    def open(self, sha256: str, start: int = 0, length: int | None = None,
             kind: str | None = None) -> ArtifactStream:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        key = self._key(sha256)
        ranged = start > 0 or length is not None
        if length == 0:
            size = self._size(sha256, kind)
            return ArtifactStream(iter(()), size, start, 0)
        byte_range = f"bytes={start}-{'' if length is None else start + length - 1}"
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key, **({"Range": byte_range} if ranged else {}))
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange":  # start at or past the end
                return ArtifactStream(iter(()), self._size(sha256, kind), start, 0)
            raise self._unavailable(sha256, kind, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(sha256, kind, exc) from exc
        body, got = answer["Body"], int(answer["ContentLength"])
        size = int(answer["ContentRange"].rsplit("/", 1)[1]) if answer.get("ContentRange") else got

        def chunks():
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            except BotoCoreError as exc:
                raise self._unavailable(sha256, kind, exc) from exc
        return ArtifactStream(chunks(), size, start, got, body.close)

    def _size(self, sha256: str, kind: str | None) -> int:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))["ContentLength"])
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable(sha256, kind, exc) from exc


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
