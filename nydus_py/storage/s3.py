"""Blobs as objects in an S3 bucket (nydusd's `backend.type = "s3"`).

    "backend": {"type": "s3", "config": {
        "endpoint": "s3.us-east-1.amazonaws.com", "scheme": "https", "region": "us-east-1",
        "bucket_name": "images", "object_prefix": "nydus/", "force_path_style": true,
        "access_key_id": "...", "access_key_secret": "...", "session_token": "",
        "timeout": 5, "connect_timeout": 5, "retry_limit": 2}}

The object key of a blob is `object_prefix + <hex digest>` (nydusd and nydusify: blob ids are
the sha256 hex, the prefix is prepended verbatim). Requests are path-style
(`<endpoint>/<bucket>/<key>`) like nydusd unless `force_path_style` is false.

HTTP, SigV4 signing and credentials are botocore's client: it is thread-safe, signs every
request (including multipart uploads) and resolves credentials with the standard AWS chain
when `access_key_id`/`access_key_secret` are not set (env AWS_ACCESS_KEY_ID/..., shared
credentials and config files with AWS_PROFILE, web identity, container and instance metadata).
Its own retries are off (`total_max_attempts=1`): retries are RetryingBackend's, as for every
backend. botocore is imported when an S3Backend is built, not when config is parsed.

Errors: missing object → BlobNotFoundError; refused credentials → AuthError with one line
naming the bucket and the S3 error code; 5xx, throttling, timeouts and dropped connections →
transient BackendError; everything else → permanent BackendError.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Mapping

from nydus_py.config.schema import S3BackendConfig
from nydus_py.errors import AuthError, BackendError, BlobNotFoundError, ConfigError
from nydus_py.storage.backend import add_size_hints, blob_hex, check_range, range_error
from nydus_py.storage.tls import ca_bundle

MULTIPART_THRESHOLD = 64 << 20        # put_blob: larger files go up in parts of this size
AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                        "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId",
                        "UnrecognizedClientException", "AuthorizationHeaderMalformed", "403", "401"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                             "Throttling", "ThrottlingException", "RequestTimeTooSkewed", "503", "500"})


class S3Backend:
    """`BlobBackend` over an S3 bucket (see storage/backend.py for the contract), plus
    `put_blob` for the converter."""

    @classmethod
    def from_config(cls, config: S3BackendConfig) -> S3Backend:
        return cls(config)

    def __init__(self, config: S3BackendConfig, *, pool_size: int = 16):
        try:
            import botocore.config
            import botocore.session
        except ImportError:                          # pragma: no cover - depends on install
            raise ConfigError("backend.type 's3' needs botocore (pip install botocore)") from None
        self.config = config
        session = botocore.session.get_session()
        bc = botocore.config.Config(
            connect_timeout=config.connect_timeout, read_timeout=config.timeout,
            retries={"total_max_attempts": 1}, max_pool_connections=pool_size,
            s3={"addressing_style": "path" if config.force_path_style else "virtual"},
            signature_version="s3v4", user_agent_extra="nydus-py")
        kw: dict[str, Any] = {"config": bc,
                              "verify": False if config.skip_verify else (ca_bundle(config.ca_cert_files) or True)}
        if config.region:
            kw["region_name"] = config.region
        if config.endpoint:
            kw["endpoint_url"] = f"{config.scheme}://{config.endpoint}"
        elif config.scheme == "http":
            kw["use_ssl"] = False
        if config.access_key_id:
            kw.update(aws_access_key_id=config.access_key_id,
                      aws_secret_access_key=config.access_key_secret,
                      aws_session_token=config.session_token or None)
        try:
            self._client = session.create_client("s3", **kw)
        except Exception as e:  # botocore: NoRegionError, InvalidEndpoint, ...
            raise ConfigError(f"backend.config: cannot set up S3 client ({e})") from None
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        c = self.config
        return f"S3Backend({c.endpoint or 'aws'}/{c.bucket_name}/{c.object_prefix}*)"

    def key(self, blob_id: str) -> str:
        return self.config.object_prefix + blob_hex(blob_id)

    # -- BlobBackend --------------------------------------------------------------------------
    def blob_size(self, blob_id: str) -> int:
        key = self.key(blob_id)
        with self._lock:
            size = self._sizes.get(blob_id)
        return size if size is not None else self._head(blob_id, key)

    def hint_sizes(self, sizes: Mapping[str, int]) -> None:
        """Sizes from the image's verified manifest (storage/backend.py: hint_blob_sizes)."""
        with self._lock:
            add_size_hints(self._sizes, sizes)

    def probe_blob(self, blob_id: str) -> int:
        """A HEAD whatever is known (a pooled connection for the first read; see
        RegistryBackend.probe_blob); a hinted size stays."""
        return self._head(blob_id, self.key(blob_id))

    def _head(self, blob_id: str, key: str) -> int:
        resp = self._call(blob_id, f"HEAD {key}", self._client.head_object,
                          Bucket=self.config.bucket_name, Key=key)
        size = int(resp["ContentLength"])
        with self._lock:
            return self._sizes.setdefault(blob_id, size)

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        size = self.blob_size(blob_id)
        if offset + length > size:
            raise range_error(blob_id, offset, length, size, self._where(self.key(blob_id)))
        if length == 0:
            return b""
        key = self.key(blob_id)
        what = f"GET {key} bytes {offset}-{offset + length - 1}"
        resp = self._call(blob_id, what, self._client.get_object, Bucket=self.config.bucket_name,
                          Key=key, Range=f"bytes={offset}-{offset + length - 1}")
        body = resp["Body"]
        try:
            if resp.get("ResponseMetadata", {}).get("HTTPStatusCode") != 206 and offset > 0:
                raise BackendError(f"blob {blob_id}: {self._where(key)} ignored the Range header "
                                   f"(HTTP 200 for {what})", permanent=True)
            data = self._guard(blob_id, what, body.read, length)
        finally:
            body.close()
        if len(data) != length:
            raise BackendError(f"blob {blob_id}: short body from {self._where(key)} for "
                               f"[{offset}, {offset + length}): {len(data)} bytes", permanent=False)
        return data

    def close(self) -> None:
        self._client.close()

    # -- converter side -----------------------------------------------------------------------
    def has_blob(self, blob_id: str) -> bool:
        try:
            self.blob_size(blob_id)
        except BlobNotFoundError:
            return False
        return True

    def put_blob(self, blob_id: str, path: str | os.PathLike[str]) -> str:
        """Upload the file at `path` as `blob_id`; "exists" if the object is already there with
        the same size, else "uploaded". Files over MULTIPART_THRESHOLD go up in parts. The
        caller vouches that the file hashes to `blob_id` (the converter just wrote it)."""
        key = self.key(blob_id)
        size = os.path.getsize(path)
        try:
            if self.blob_size(blob_id) == size:
                return "exists"
        except BlobNotFoundError:
            pass
        bucket = self.config.bucket_name
        with open(path, "rb") as f:
            if size <= MULTIPART_THRESHOLD:
                self._call(blob_id, f"PUT {key}", self._client.put_object, Bucket=bucket, Key=key,
                           Body=f, ContentLength=size)
            else:
                self._multipart(blob_id, key, f, size)
        with self._lock:
            self._sizes[blob_id] = size
        return "uploaded"

    def _multipart(self, blob_id: str, key: str, f, size: int) -> None:
        bucket = self.config.bucket_name
        up = self._call(blob_id, f"start multipart upload of {key}", self._client.create_multipart_upload,
                        Bucket=bucket, Key=key)["UploadId"]
        try:
            parts = []
            for n, start in enumerate(range(0, size, MULTIPART_THRESHOLD), 1):
                chunk = f.read(MULTIPART_THRESHOLD)
                r = self._call(blob_id, f"upload part {n} of {key}", self._client.upload_part, Bucket=bucket,
                               Key=key, UploadId=up, PartNumber=n, Body=chunk)
                parts.append({"PartNumber": n, "ETag": r["ETag"]})
            self._call(blob_id, f"complete multipart upload of {key}", self._client.complete_multipart_upload,
                       Bucket=bucket, Key=key, UploadId=up, MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up)
            except Exception:
                pass
            raise

    # -- errors -------------------------------------------------------------------------------
    def _where(self, key: str) -> str:
        c = self.config
        return f"s3://{c.bucket_name}/{key}" + (f" at {c.endpoint}" if c.endpoint else "")

    def _call(self, blob_id: str, what: str, fn, **kw):
        return self._guard(blob_id, what, fn, **kw)

    def _guard(self, blob_id: str, what: str, fn, *args, **kw):
        from botocore import exceptions as bx
        try:
            return fn(*args, **kw)
        except bx.ClientError as e:
            raise self._client_error(blob_id, what, e) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as e:
            raise AuthError(f"blob {blob_id}: no usable AWS credentials for s3://{self.config.bucket_name} "
                            f"({e}); set access_key_id/access_key_secret or the AWS_* environment") from None
        except (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectTimeoutError,
                bx.ReadTimeoutError, bx.IncompleteReadError, bx.ResponseStreamingError,
                bx.HTTPClientError) as e:
            raise BackendError(f"blob {blob_id}: {what} on {self._where('')}: {e.__class__.__name__} ({e})",
                               permanent=False) from None
        except bx.BotoCoreError as e:
            raise BackendError(f"blob {blob_id}: {what}: {e}", permanent=True) from None

    def _client_error(self, blob_id: str, what: str, e) -> BackendError:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = err.get("Message") or ""
        line = f"{what}: HTTP {status} {code}" + (f" ({msg})" if msg and msg != code else "")
        key_where = self._where(self.key(blob_id))
        if code in NOT_FOUND_CODES:
            return BlobNotFoundError(f"blob {blob_id} not found at {key_where}")
        if code == "NoSuchBucket":
            return BackendError(f"blob {blob_id}: bucket {self.config.bucket_name!r} does not exist "
                                f"({self._where('')})", permanent=True)
        if code in AUTH_CODES or status in (401, 403):
            return AuthError(f"blob {blob_id}: S3 refused the credentials for {key_where}: "
                             f"{code if code and not code.isdigit() else f'HTTP {status}'}"
                             + (f" ({msg})" if msg and msg != code else "")
                             + "; check access_key_id/access_key_secret or the AWS credential chain")
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return BackendError(f"blob {blob_id}: {line}", permanent=False)
        return BackendError(f"blob {blob_id}: {line} on {key_where}", permanent=True)
