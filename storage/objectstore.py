"""Every byte to or from the dataset root goes through an ObjectStore: a local directory or S3.

The commit protocol needs only two primitives beyond put/get: create-only writes (claims and
manifests) and compare-and-swap (refs). Both stores give them with the same semantics, so the
version logic above is written once and tested against both.

S3 endpoint, region, addressing and credentials are resolved once, in storage/s3.py, and every
client here (boto3 and pyarrow) is built from that one resolution.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from schemas.config import S3Config
from storage.s3 import S3Access, S3Settings

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
# Basenames with this prefix are the local store's own temp and lock files: never keys.
_INTERNAL = ".speechpairs-"


class NotFound(Exception):
    """The key does not exist."""


class PreconditionFailed(Exception):
    """A create-only write found the key present, or a compare-and-swap found another etag."""


def check_key(key: str) -> str:
    """Keys are '/'-separated and relative; '..', empty parts and internal names are refused
    so a key can never escape the root of a local store."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}: must be relative and name an object")
    for part in key.split("/"):
        if part in ("", ".", "..") or part.startswith(_INTERNAL):
            raise ValueError(f"invalid object key {key!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # epoch seconds (file mtime, S3 LastModified)


class ObjectStore(ABC):
    """A flat key → bytes namespace under `root` with the conditional writes versioning needs."""

    root: str

    @abstractmethod
    def uri(self, key: str) -> str:
        """Full URI (s3://…) or absolute path of a key, for logs, cards and external readers."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None, durable: bool = True) -> str:
        """Write atomically and return the new etag. `if_none_match` = create-only;
        `if_match` = replace only if the current etag equals it. Losing raises PreconditionFailed.
        `durable=False` skips the flush to disk where a backend has one (caches: a lost entry is
        only redone, and fsync per small object would dominate their cost)."""

    @abstractmethod
    def put_file(self, key: str, local_path: str | Path, *, sha256: str | None = None) -> None:
        """Upload a (large) local file; readers never see a partial object. `sha256` (hex, of the
        file) goes along where the store checks it on receipt (S3), so a corrupted upload fails."""

    @abstractmethod
    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """Content and etag, the etag usable as `if_match` for a later put. Raises NotFound."""

    def get_bytes(self, key: str) -> bytes:
        """Content of a key. Raises NotFound."""
        return self.get_with_etag(key)[0]

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix` (plain string prefix, as S3), sorted by key."""

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with `prefix`, sorted."""
        return (info.key for info in self.list_info(prefix))

    def list_dirs(self, prefix: str) -> Sequence[str]:
        """The names of the "folders" right under `prefix` (ending in `/`): the first path segment
        after it of every key below it, sorted; stores override it to avoid listing every key."""
        return sorted({k[len(prefix):].split("/", 1)[0] for k in self.list(prefix) if "/" in k[len(prefix):]})

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key; removing a missing key is not an error (as on S3)."""

    @abstractmethod
    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy without passing the bytes through this process where the backend allows."""

    @abstractmethod
    def download_file(self, key: str, local_path: str | Path) -> None: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Object size in bytes. Raises NotFound."""

    @abstractmethod
    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Stream the content in chunks (for checksums of large shards). Raises NotFound."""

    def sha256(self, key: str) -> str:
        """sha256 hex of the stored bytes, streamed, so a copy can be verified as committed."""
        digest = hashlib.sha256()
        for chunk in self.iter_bytes(key):
            digest.update(chunk)
        return digest.hexdigest()

    @abstractmethod
    def arrow_fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem and the base path that `key` is appended to (base + '/' + key)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"


# --------------------------------------------------------------------------------------------
# Local directory
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalStore(ObjectStore):
    """A directory as an object store.

    Every write lands in a temp file in the target's directory and is then renamed (plain) or
    hard-linked (create-only: link fails if the name exists, atomically) into place, so a
    reader never sees half an object. Compare-and-swap holds an flock on a per-key lock file;
    the etag is the sha256 of the content, so it needs no side table.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        text = self.root.removeprefix("file://")
        self.base = Path(text).expanduser().absolute()

    # -- paths ---------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.base.joinpath(*check_key(key).split("/"))

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def _temp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{_INTERNAL}tmp-", dir=path.parent)
        os.close(fd)
        return Path(name)

    def _write_temp(self, path: Path, data: bytes, durable: bool = True) -> Path:
        tmp = self._temp_for(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """Exclusive per-key lock (flock) serialising compare-and-swap between processes."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = path.parent / f"{_INTERNAL}lock-{path.name}"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- writes --------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None, durable: bool = True) -> str:
        if if_none_match and if_match is not None:
            raise ValueError("if_none_match and if_match are exclusive")
        path = self._path(key)
        tmp = self._write_temp(path, data, durable)
        try:
            if if_none_match:
                self._link_exclusive(tmp, path, key)
            elif if_match is not None:
                with self._locked(path):
                    try:
                        current = path.read_bytes()
                    except FileNotFoundError:
                        raise PreconditionFailed(f"{key}: does not exist (expected etag {if_match})") from None
                    if _sha256(current) != if_match:
                        raise PreconditionFailed(f"{key}: changed since it was read")
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if durable:
            _fsync_dir(path.parent)
        return _sha256(data)

    def _link_exclusive(self, tmp: Path, path: Path, key: str) -> None:
        """Atomic create-only: link(2) fails with EEXIST if the name is taken."""
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise PreconditionFailed(f"{key}: already exists") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        # Filesystems without hard links: O_EXCL claims the name, the lock keeps CAS readers off
        # until the content is complete.
        with self._locked(path):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise PreconditionFailed(f"{key}: already exists") from None
            with os.fdopen(fd, "wb") as fh, open(tmp, "rb") as src:
                shutil.copyfileobj(src, fh)
                fh.flush()
                os.fsync(fh.fileno())

    def put_file(self, key: str, local_path: str | Path, *, sha256: str | None = None) -> None:
        path = self._path(key)
        tmp = self._temp_for(path)
        try:
            shutil.copyfile(local_path, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def copy(self, src_key: str, dst_key: str) -> None:
        src = self._path(src_key)
        if not src.is_file():
            raise NotFound(src_key)
        self.put_file(dst_key, src)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        (path.parent / f"{_INTERNAL}lock-{path.name}").unlink(missing_ok=True)
        # Prune now-empty directories so a deleted prefix leaves nothing behind (as on S3).
        parent = path.parent
        while parent != self.base and self.base in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    # -- reads ---------------------------------------------------------------------------
    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, _sha256(data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(key)
        return path.stat().st_size

    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        try:
            fh = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None
        return _chunks(fh, chunk_size)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the deepest directory the prefix names, then filter by the string prefix.
        head, _, _ = prefix.rpartition("/")
        start = self.base.joinpath(*head.split("/")) if head else self.base
        if not start.is_dir():
            return iter(())
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(_INTERNAL)]
            rel = Path(dirpath).relative_to(self.base).as_posix()
            for name in filenames:
                if name.startswith(_INTERNAL):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:  # removed since it was listed
                        continue
                    found.append(ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime))
        return iter(sorted(found, key=lambda info: info.key))

    def list_dirs(self, prefix: str) -> Sequence[str]:
        if prefix and not prefix.endswith("/"):  # a partial name: the base class's scan
            return super().list_dirs(prefix)
        folder = self.base.joinpath(*prefix.rstrip("/").split("/")) if prefix else self.base
        try:
            return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(_INTERNAL))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def download_file(self, key: str, local_path: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(key)
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local_path)

    def arrow_fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), self.base.as_posix()


def _chunks(fh: Any, chunk_size: int) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# S3 (any S3-compatible endpoint)
# --------------------------------------------------------------------------------------------

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
# AWS answers 409 ConditionalRequestConflict when two conditional writes race on one key.
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_MAX_SINGLE_COPY = 5 * 1024**3
# What a store that does not implement upload checksums answers (a bad digest is BadDigest /
# InvalidRequest with a checksum message on AWS and is not among these: it fails the upload).
_CHECKSUM_REFUSED = {"NotImplemented", "InvalidArgument", "UnsupportedChecksumAlgorithm"}


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix/' → ('bucket', 'some/prefix')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, prefix.strip("/")


class S3Store(ObjectStore):
    """An S3 bucket/prefix via boto3, with conditional PutObject (If-None-Match / If-Match).

    Retries (standard mode, exponential backoff with jitter) are botocore's; a create-only or
    compare-and-swap write that really succeeded but whose answer was lost comes back as
    PreconditionFailed on retry, which the version logic tolerates by re-reading.
    """

    def __init__(self, root: str, s3: S3Config | S3Settings | None = None, *,
                 multipart_bytes: int = 64 * 1024**2) -> None:
        from boto3.s3.transfer import TransferConfig

        self.root = root
        self.bucket, self.prefix = split_s3_uri(root)
        self.access = S3Access(s3)
        self.settings = self.access.settings
        self.config = self.settings.as_config()  # resolved values: reopening elsewhere reaches the same store
        self.client = self.access.client()
        # Files above `multipart_bytes` go up in parts of that size (S3's minimum part is 5 MiB).
        part = max(multipart_bytes, 5 * 1024**2)
        self._transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=4)
        self._checksums: bool | None = None  # does the store take upload checksums (None: not tried yet)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _translate(self, exc: ClientError, key: str) -> Exception:
        """S3 error answers → NotFound / PreconditionFailed; any other error passes through."""
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _PRECONDITION_CODES or status == "412":
            return PreconditionFailed(f"{self.uri(key)}: precondition failed ({code})")
        if code in _NOT_FOUND_CODES or status == "404":
            return NotFound(self.uri(key))
        return exc

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None, durable: bool = True) -> str:
        if if_none_match and if_match is not None:
            raise ValueError("if_none_match and if_match are exclusive")
        extra: dict[str, str] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except ClientError as exc:
            raise self._translate(exc, key) from None
        return str(resp["ETag"])

    def put_file(self, key: str, local_path: str | Path, *, sha256: str | None = None) -> None:
        """With `sha256`, the store verifies what it received: a single PUT carries the whole file's
        ChecksumSHA256; a multipart upload asks for SHA256 per part (S3 checks each part). A store
        that refuses checksums (answers the first such upload with an error) is remembered and
        uploaded to without them; the sha256 is still recorded and `datasets verify` re-reads it."""
        if sha256 is not None and self._checksums is not False:
            try:
                self._put_file_checked(key, Path(local_path), sha256)
                self._checksums = True
                return
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if self._checksums is True or code not in _CHECKSUM_REFUSED:
                    raise self._translate(exc, key) from None
                log.warning("%s refused an upload checksum (%s); uploading without, sha256 still recorded",
                            self.uri(key), code)
                self._checksums = False
        self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=self._transfer)

    def _put_file_checked(self, key: str, local_path: Path, sha256: str) -> None:
        if local_path.stat().st_size < self._transfer.multipart_threshold:
            digest = base64.b64encode(bytes.fromhex(sha256)).decode()
            with open(local_path, "rb") as fh:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=fh,
                                       ChecksumAlgorithm="SHA256", ChecksumSHA256=digest)
        else:
            self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=self._transfer,
                                    ExtraArgs={"ChecksumAlgorithm": "SHA256"})

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), str(resp["ETag"])
        except ClientError as exc:
            raise self._translate(exc, key) from None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            raise self._translate(exc, key) from None

    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            raise self._translate(exc, key) from None
        return _chunks(body, chunk_size)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: list[ObjectInfo] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            found.extend(ObjectInfo(key=obj["Key"][strip:], size=int(obj["Size"]),
                                    mtime=obj["LastModified"].timestamp()) for obj in page.get("Contents", []))
        return iter(sorted(found, key=lambda info: info.key))

    def list_dirs(self, prefix: str) -> Sequence[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            names.extend(p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(names)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            translated = self._translate(exc, key)
            if not isinstance(translated, NotFound):
                raise translated from None

    def copy(self, src_key: str, dst_key: str) -> None:
        source = {"Bucket": self.bucket, "Key": self._key(src_key)}
        try:
            if self.size(src_key) <= _MAX_SINGLE_COPY:
                self.client.copy_object(Bucket=self.bucket, Key=self._key(dst_key), CopySource=source)
            else:  # managed multipart copy (UploadPartCopy), still server-side
                self.client.copy(source, self.bucket, self._key(dst_key), Config=self._transfer)
        except ClientError as exc:
            raise self._translate(exc, dst_key) from None

    def download_file(self, key: str, local_path: str | Path) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local_path), Config=self._transfer)
        except ClientError as exc:
            raise self._translate(exc, key) from None

    def arrow_fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return self.access.arrow_filesystem(), base


def open_store(root: str, s3: S3Config | S3Settings | None = None) -> ObjectStore:
    """`s3://bucket/prefix` → S3Store; anything else (path or file://) → LocalStore."""
    if root.startswith("s3://"):
        return S3Store(root, s3)
    if "://" in root and not root.startswith("file://"):
        raise ValueError(f"unsupported storage root {root!r}: use a local path or s3://bucket/prefix")
    return LocalStore(root)
