"""Storage problems in words an operator acts on, and a probe of the output root before any clip.

boto3, pyarrow and the OS each fail in their own vocabulary ("AccessDenied … PutObject" for a bucket
that does not exist, "AWS Error NETWORK_CONNECTION", "Errno 13"). `explain` maps any of them to one
of a few kinds, each with the setting to check; `check_writable` finds them before a run spends
hours, with a create-only probe write in the dataset's staging area (the commit protocol needs
create-only writes, so a store without them is found here too, not at the end of the run).
"""

from __future__ import annotations

import errno
import logging
import uuid
from typing import Literal

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
)

from storage.layout import probe_key
from storage.objectstore import NotFound, ObjectStore, PreconditionFailed, S3Store

log = logging.getLogger(__name__)

Kind = Literal["bucket missing", "access denied", "bad credentials", "endpoint unreachable",
               "not writable", "no conditional writes"]
PROBE_ATTEMPTS = 2  # the probe fails fast on an unreachable endpoint instead of backing off 8 times

_MISSING_BUCKET = {"NoSuchBucket"}
_DENIED = {"AccessDenied", "Forbidden", "403", "AllAccessDisabled", "AccountProblem"}
_BAD_KEYS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
             "InvalidClientTokenId", "UnrecognizedClientException", "AuthorizationHeaderMalformed"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ProxyConnectionError)
_NO_KEYS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
# pyarrow (AWS C++ SDK) error texts → kinds
_ARROW_WORDS: tuple[tuple[str, Kind], ...] = (
    ("NO_SUCH_BUCKET", "bucket missing"), ("bucket does not exist", "bucket missing"),
    ("INVALID_ACCESS_KEY_ID", "bad credentials"), ("SIGNATURE_DOES_NOT_MATCH", "bad credentials"),
    ("ACCESS_DENIED", "access denied"), ("NETWORK_CONNECTION", "endpoint unreachable"),
    ("Couldn't connect to server", "endpoint unreachable"),
)


class StorageProblem(RuntimeError):
    """A storage failure classified, with the setting to check (the message holds no secret)."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _where(store: ObjectStore | None) -> str:
    if isinstance(store, S3Store):
        return f"{store.root} at {store.settings.describe()} "
    return f"{store.root} " if store is not None else ""


def _fix(kind: Kind, store: ObjectStore | None, s3: bool) -> str:
    if kind == "bucket missing":
        bucket = f" {store.bucket!r}" if isinstance(store, S3Store) else ""
        return f"create the bucket{bucket}, or fix the bucket in output.root / the dataset URI"
    if kind == "access denied":
        return ("the credentials lack permission there (reading needs s3:GetObject and s3:ListBucket, runs "
                "also s3:PutObject and s3:DeleteObject); check the key's policy, AWS_PROFILE or "
                "s3.credentials_block" if s3
                else "make the folder writable for this user, or choose another output.root")
    if kind == "bad credentials":
        return ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the Prefect block named "
                "by s3.credentials_block)")
    if kind == "endpoint unreachable":
        return "check s3.endpoint_url / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and that the store is up"
    if kind == "no conditional writes":
        return ("the store ignores If-None-Match on PutObject, which committing versions safely needs; use a "
                "store that supports conditional writes (AWS S3, MinIO, SeaweedFS, Ceph RGW ≥ 18)")
    return "choose an output.root this user can create and write"


def explain(exc: BaseException, store: ObjectStore | None = None) -> StorageProblem | None:
    """`exc` as a StorageProblem naming the kind, where, and what to check; None if it is no storage
    failure we recognise (the caller reports it as it is)."""
    kind: Kind | None = None
    detail = ""
    if isinstance(exc, StorageProblem):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        detail = f"{code or status} on {exc.operation_name}"
        if code in _MISSING_BUCKET:
            kind = "bucket missing"
        elif code in _BAD_KEYS:
            kind = "bad credentials"
        elif code in _DENIED or status == "403":
            kind = "access denied"
    elif isinstance(exc, _NO_KEYS):
        kind, detail = "bad credentials", "no credentials found"
    elif isinstance(exc, _UNREACHABLE):
        kind, detail = "endpoint unreachable", type(exc).__name__
    elif isinstance(exc, BotoCoreError):
        return None
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        kind, detail = "access denied", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
        kind, detail = "not writable", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    elif isinstance(exc, OSError):
        text = str(exc)
        kind = next((k for word, k in _ARROW_WORDS if word.lower() in text.lower()), None)
        detail = text.splitlines()[0][:200] if text else type(exc).__name__
    if kind is None:
        return None
    s3 = isinstance(store, S3Store) or isinstance(exc, (ClientError, BotoCoreError)) or "AWS Error" in str(exc)
    return StorageProblem(kind, f"{_where(store)}({detail}); {_fix(kind, store, s3)}")


def check_writable(store: ObjectStore, dataset: str) -> None:
    """Raise StorageProblem unless the run can create, overwrite-protect and delete objects under
    `<root>/<dataset>/_staging/`; leaves nothing behind."""
    key = probe_key(dataset, uuid.uuid4().hex)
    probe = store
    if isinstance(store, S3Store):
        probe = S3Store(store.root, store.settings.model_copy(update={"max_attempts": PROBE_ATTEMPTS}))
        _check_bucket(probe)
    try:
        probe.put_bytes(key, b"speechpairs write probe", if_none_match=True, durable=False)
    except Exception as exc:  # noqa: BLE001 - classified below, or passed on unchanged
        raise _classified(exc, probe) from None
    try:
        probe.put_bytes(key, b"again", if_none_match=True, durable=False)
    except PreconditionFailed:
        pass  # create-only writes hold
    except Exception as exc:  # noqa: BLE001
        raise _classified(exc, probe) from None
    else:
        _delete(probe, key)
        raise StorageProblem("no conditional writes", f"{_where(probe)}; {_fix('no conditional writes', probe, True)}")
    _delete(probe, key)


def _check_bucket(store: S3Store) -> None:
    """A missing bucket by name: some stores answer a write to it with AccessDenied."""
    try:
        store.client.head_bucket(Bucket=store.bucket)
    except ClientError as exc:
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if status == "404" or code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageProblem("bucket missing", f"{_where(store)}(the bucket {store.bucket!r} does not exist); "
                                 f"{_fix('bucket missing', store, True)}") from None
        if status != "403":  # 403: this key may not list buckets; the probe write decides
            raise _classified(exc, store) from None
    except Exception as exc:  # noqa: BLE001
        raise _classified(exc, store) from None


def _classified(exc: BaseException, store: ObjectStore) -> BaseException:
    return explain(exc, store) or exc


def _delete(store: ObjectStore, key: str) -> None:
    try:
        store.delete(key)
    except (NotFound, OSError, ClientError) as exc:  # a leftover probe is harmless: gc removes it
        log.warning("could not remove the write probe %s: %s", store.uri(key), exc)

