"""Object stores: Amazon S3 (and S3-compatible servers) and Azure Blob Storage.

Layout (../shared/design.md): `{prefix}{BatchId}/{series uid}/{sop uid}.dcm` per instance
and `{prefix}{BatchId}/manifest.json`, written by the worker once every file of the batch
is there. Each object carries the metadata `batch_id`, `priority` and `uploaded_at` and its
content type. Uploads stream from the spool: small files in one request, large ones in
parts of bounded size (S3 multipart, Azure blocks), so memory stays flat whatever the
instance's size. A retried upload writes the same key; an item whose upload began before
(a kill, a lost answer) is looked for first and not written again if it is there, so a
versioned bucket shows one version per key.

Credentials come only from boto3's standard chain (environment, profile, instance role)
or the environment variable `connection_string_env` names; they are never logged. A
missing bucket or container is destination-wide and never created.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from node.batches import Item, Manifest, iso_now
from node.config import Destination
from node.destinations import Result, Status, Unavailable, register

DICOM, JSON = "application/dicom", "application/json"
PART_SIZE = 8 * 1024 * 1024  # bytes per multipart part / per single PUT at most: the memory bound
MAX_PARTS = 9_000  # S3 allows 10,000; larger instances get larger parts
GROUP, GROUP_BYTES = 8, 64 * 1024 * 1024  # objects whose results share one commit (STAT waits at most one group)


def key(prefix: str, batch_id: str, name: str) -> str:
    return f"{prefix}{batch_id}/{name}"


def metadata(batch_id: str, priority: str) -> dict[str, str]:
    return {"batch_id": batch_id, "priority": priority, "uploaded_at": iso_now()}


class _ObjectStore:
    """What S3 and Azure share: one item per request, the layout, look-before-rewrite."""

    manifests = True

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.prefix = destination.prefix

    def groups(self, items: Sequence[Item]) -> list[list[Item]]:
        """Up to GROUP items (one commit for their results), fewer when they are large."""
        groups: list[list[Item]] = [[]]
        for item in items:
            if len(groups[-1]) >= GROUP or (groups[-1] and sum(i.size for i in groups[-1]) + item.size > GROUP_BYTES):
                groups.append([])
            groups[-1].append(item)
        return [group for group in groups if group]

    def send(self, items: Sequence[Item]) -> list[Result]:
        """One object per item. A destination-wide problem after some were stored returns those (the
        rest go back to the queue, and the next try meets the problem and backs off)."""
        results: list[Result] = []
        for item in items:
            try:
                results.append(self._send_one(item))
            except Unavailable:
                if not results:
                    raise
                break
        return results

    def _send_one(self, item: Item) -> Result:
        name = key(self.prefix, item.batch_id, item.object_name)
        if not item.path.exists():  # cannot happen unless someone deleted the spool: say so, don't spin
            return Result(item, Status.FAIL, "spool file missing")
        if item.started and self._has(name, item.size, item.batch_id):
            return Result(item, Status.OK, "already there")
        refusal = self._put_file(name, item)
        return Result(item, Status.FAIL, refusal) if refusal else Result(item, Status.OK)

    def put_manifest(self, manifest: Manifest) -> None:
        name = key(self.prefix, manifest.batch_id, "manifest.json")
        if manifest.started and self._has(name, len(manifest.body), manifest.batch_id):
            return
        refusal = self._put_bytes(name, manifest.body, metadata(manifest.batch_id, manifest.priority))
        if refusal:
            raise Unavailable(f"manifest refused: {refusal}")

    def _put_file(self, name: str, item: Item) -> str:
        """Upload the spooled file; '' when stored, else why the store refused this object."""
        raise NotImplementedError

    def _put_bytes(self, name: str, body: bytes, meta: dict[str, str]) -> str:
        raise NotImplementedError

    def _has(self, name: str, size: int, batch_id: str) -> bool:
        """The object is there, complete, from this batch (uploads are atomic: no partial objects)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- S3 -----------------------------------------------------------------------------------------

#: S3 error codes that are destination-wide: credentials refused ...
S3_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "AuthorizationHeaderMalformed"}
#: ... or throttling, the server, the clock, the wrong region.
S3_WIDE = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "Throttling",
           "PermanentRedirect"}


@register("s3")
class S3(_ObjectStore):
    """boto3's S3 client; PutObject below PART_SIZE, multipart above it."""

    def __init__(self, destination: Destination) -> None:
        super().__init__(destination)
        import boto3
        from botocore.config import Config

        self.bucket = destination.bucket
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=destination.endpoint_url or None, region_name=destination.region or None,
            config=Config(connect_timeout=destination.connect_timeout, read_timeout=destination.network_timeout,
                          retries={"max_attempts": 2, "mode": "standard"}))

    def _call(self, operation: Callable[..., Any], **kwargs: Any) -> tuple[Any, str]:
        """Run one S3 call: (response, '') or (None, why this object was refused); Unavailable when
        the problem is the destination's."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return operation(Bucket=self.bucket, **kwargs), ""
        except (ClientError, BotoCoreError) as exc:
            return None, self._refusal(exc)

    def _refusal(self, exc: Exception) -> str:
        """Why S3 refused this object; raises Unavailable when the problem is the destination's."""
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            raise Unavailable("S3: no credentials in boto3's chain (environment, profile, role)") from None
        if not isinstance(exc, ClientError):  # endpoint unreachable, timeouts, TLS
            raise Unavailable(f"S3: {type(exc).__name__}: {_short(exc)}") from None
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            raise Unavailable(f"S3: bucket {self.bucket!r} does not exist (the node never creates it)") from None
        if code in S3_AUTH or status in (401, 403):
            raise Unavailable(f"S3: credentials refused ({code}, HTTP {status}) for bucket {self.bucket!r}") from None
        if code in S3_WIDE or status in (408, 429) or status >= 500:
            raise Unavailable(f"S3: {code} (HTTP {status}) from bucket {self.bucket!r}") from None
        return f"S3: {code} (HTTP {status})"

    def _put_file(self, name: str, item: Item) -> str:
        meta = metadata(item.batch_id, item.priority_name)
        with open(item.path, "rb") as handle:
            if item.size <= PART_SIZE:
                return self._call(self.client.put_object, Key=name, Body=handle, ContentLength=item.size,
                                  ContentType=DICOM, Metadata=meta)[1]
            return self._multipart(name, handle, item.size, meta)

    def _multipart(self, name: str, handle: BinaryIO, size: int, meta: dict[str, str]) -> str:
        """Parts read one at a time from the file; the upload is aborted if it cannot be completed."""
        part_size = max(PART_SIZE, math.ceil(size / MAX_PARTS))
        started, refusal = self._call(self.client.create_multipart_upload, Key=name, ContentType=DICOM, Metadata=meta)
        if refusal:
            return refusal
        upload = started["UploadId"]
        try:
            parts = []
            for number in range(1, math.ceil(size / part_size) + 1):
                answer, refusal = self._call(self.client.upload_part, Key=name, UploadId=upload, PartNumber=number,
                                             Body=handle.read(part_size))
                if refusal:
                    break
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            else:
                refusal = self._call(self.client.complete_multipart_upload, Key=name, UploadId=upload,
                                     MultipartUpload={"Parts": parts})[1]
        except BaseException:
            self._abort(name, upload)
            raise
        if refusal:
            self._abort(name, upload)
        return refusal

    def _abort(self, name: str, upload: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload)
        except Exception:  # the server is gone: a lifecycle rule removes abandoned parts (README)
            pass

    def _put_bytes(self, name: str, body: bytes, meta: dict[str, str]) -> str:
        return self._call(self.client.put_object, Key=name, Body=body, ContentType=JSON, Metadata=meta)[1]

    def _has(self, name: str, size: int, batch_id: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError) as exc:
            missing = isinstance(exc, ClientError) and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
            if not missing:
                self._refusal(exc)  # raises Unavailable when it is the destination's problem
            return False  # not there (or not readable as such): upload it; the key is the same
        meta = head.get("Metadata", {})
        # Servers behind a WSGI layer or nginx may turn the underscore into a dash (AWS keeps it).
        return head.get("ContentLength") == size and batch_id in (meta.get("batch_id"), meta.get("batch-id"))

    def close(self) -> None:
        self.client.close()


# -- Azure --------------------------------------------------------------------------------------


@register("azure")
class Azure(_ObjectStore):
    """azure-storage-blob; one Put Blob up to PART_SIZE, staged blocks of 4 MiB above it."""

    def __init__(self, destination: Destination) -> None:
        super().__init__(destination)
        self.container: Any = None

    def _container(self) -> Any:
        """The container client, built on first use from the environment variable (read then, so a
        variable set after the start is picked up once the destination is retried)."""
        if self.container is None:
            import os

            from azure.storage.blob import BlobServiceClient

            variable = self.destination.connection_string_env
            secret = os.environ.get(variable, "")
            if not secret:
                raise Unavailable(f"Azure: environment variable {variable} (the connection string) is not set")
            try:
                service = BlobServiceClient.from_connection_string(
                    secret, max_single_put_size=PART_SIZE, max_block_size=4 * 1024 * 1024, retry_total=1,
                    connection_timeout=self.destination.connect_timeout,
                    read_timeout=self.destination.network_timeout)
            except ValueError:  # the message could quote the secret: never pass it on
                raise Unavailable(f"Azure: the connection string in {variable} is malformed") from None
            self.container = service.get_container_client(self.destination.container)
        return self.container

    def _call(self, operation: Callable[[], Any]) -> tuple[Any, str]:
        """Run one call: (result, '') or (None, why this blob was refused); Unavailable when the
        problem is the destination's."""
        from azure.core.exceptions import AzureError

        try:
            return operation(), ""
        except AzureError as exc:
            return None, self._refusal(exc)

    def _refusal(self, exc: Exception) -> str:
        """Why Azure refused this blob; raises Unavailable when the problem is the destination's."""
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

        if _code(exc) == "ContainerNotFound":
            raise Unavailable(f"Azure: container {self.destination.container!r} does not exist "
                              "(the node never creates it)") from None
        if isinstance(exc, ClientAuthenticationError):
            raise Unavailable(f"Azure: credentials refused ({_code(exc) or exc.status_code})") from None
        if not isinstance(exc, HttpResponseError):  # unreachable, TLS, timeouts
            raise Unavailable(f"Azure: {type(exc).__name__}: {_short(exc)}") from None
        status, code = exc.status_code or 0, _code(exc) or "error"
        if status in (401, 403):
            raise Unavailable(f"Azure: credentials refused ({code}, HTTP {status})") from None
        if status in (408, 429) or status >= 500:
            raise Unavailable(f"Azure: {code} ({status})") from None
        return f"Azure: {code} ({status})"

    def _upload(self, name: str, body: Any, length: int, content_type: str, meta: dict[str, str]) -> str:
        from azure.storage.blob import ContentSettings

        blob = self._container().get_blob_client(name)
        return self._call(lambda: blob.upload_blob(body, length=length, overwrite=True, metadata=meta,
                                                   content_settings=ContentSettings(content_type=content_type),
                                                   max_concurrency=1))[1]

    def _put_file(self, name: str, item: Item) -> str:
        with open(item.path, "rb") as handle:
            return self._upload(name, handle, item.size, DICOM, metadata(item.batch_id, item.priority_name))

    def _put_bytes(self, name: str, body: bytes, meta: dict[str, str]) -> str:
        return self._upload(name, body, len(body), JSON, meta)

    def _has(self, name: str, size: int, batch_id: str) -> bool:
        from azure.core.exceptions import AzureError

        try:
            props = self._container().get_blob_client(name).get_blob_properties()
        except AzureError as exc:
            if getattr(exc, "status_code", None) != 404 or _code(exc) == "ContainerNotFound":
                self._refusal(exc)  # raises Unavailable when it is the destination's problem
            return False  # not there: upload it; the name is the same
        return props.size == size and (props.metadata or {}).get("batch_id") == batch_id

    def close(self) -> None:
        if self.container is not None:
            self.container.close()


def _code(exc: Any) -> str:
    """An Azure error's code as text (the SDK gives an enum or a string)."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


SECRET = re.compile(r"(sig|AccountKey|SharedAccessSignature|X-Amz-Signature|X-Amz-Credential)=[^&\s;]+", re.IGNORECASE)


def _short(exc: BaseException) -> str:
    """An exception's first line, bounded, with any signature or key in a URL it quotes masked."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return SECRET.sub(r"\1=…", text)[:200]
