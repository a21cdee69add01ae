"""Read-only access to corpus sources that are not local files: `s3://` and `http(s)://` URIs.

Why a store of its own: ingest lists a corpus and reads its manifests and metadata, the audio stage
reads one clip at a time, and segmentation reads slices of long recordings. None of them may copy a
corpus to local disk first, and all of them must name the URI and the setting to check when a read
fails. A `SourceStore` offers exactly that: `list(prefix)` (S3 only), `stat(uri)`, `read(uri,
start, end, max_bytes)` (a range read: S3 GetObject `Range`, HTTP `Range` header) and `open(uri)`
(a seekable, buffered file whose reads are range reads: manifests keep their byte-offset locators).

S3 clients come from storage/s3.py with the run's `s3` block, merged with a source's own `sources[N].s3`
override (another endpoint, region, profile or credentials for a corpus in another store). HTTP uses
urllib: only the URL given is fetched, a redirect is followed only to the same scheme, host and port,
and credentials in URLs are refused by the config. Local paths never come here: tasks/audio.py and
tasks/ingest keep their own hostile-file rules for them.

Which store reads a URI: `register(prefix, store)` (ingest does it for each source root and its
allowed_roots) and `store_for(uri)` (the longest registered prefix, else a store with the default
S3 resolution). `read_range(uri, start, end)` is the entry point for a slice of a long recording.
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, Literal, Protocol
from urllib.parse import urlsplit

from schemas.config import S3Config, SourceS3Config
from storage.s3 import S3Access

REMOTE_SCHEMES = ("s3", "http", "https")
HTTP_TIMEOUT_S = 60.0
OPEN_BUFFER_BYTES = 1 << 20  # one range GET per MiB of a manifest read through `open`
MAX_UNRANGED_BYTES = 64 * 1024 * 1024  # an HTTP server that ignores Range: slices only of bodies this small

Problem = Literal["missing", "denied", "too_large", "unreadable"]


class SourceReadError(OSError):
    """A remote source read that failed; `problem` says how, the message names the URI and the fix."""

    def __init__(self, problem: Problem, uri: str, message: str, size: int | None = None) -> None:
        super().__init__(message)
        self.problem: Problem = problem
        self.uri = uri
        self.size = size  # the object's size, for 'too_large'


@dataclass(frozen=True)
class Entry:
    """One object: its URI, its key relative to the listed prefix, size and version (ETag or mtime)."""

    uri: str
    rel: str
    size: int
    version: str


def is_remote(path: object) -> bool:
    """Whether `path` is an s3:// or http(s):// URI (a local path, a Path or file:// is not)."""
    text = str(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


class SourceStore(Protocol):
    """What ingest and the audio stage need from a remote source."""

    def stat(self, uri: str) -> Entry: ...

    def list(self, prefix: str) -> Iterator[Entry]: ...

    def read(self, uri: str, start: int | None = None, end: int | None = None,
             max_bytes: int | None = None) -> bytes: ...


def _check_range(uri: str, start: int | None, end: int | None) -> tuple[int, int | None]:
    lo = start or 0
    if lo < 0 or (end is not None and end < lo):
        raise ValueError(f"{uri}: bad byte range [{start}, {end})")
    return lo, end


def _too_large(uri: str, size: int, max_bytes: int) -> SourceReadError:
    return SourceReadError("too_large", uri, f"{uri}: {size:,} bytes > the {max_bytes:,} bytes allowed; not read",
                           size)


# ---------------------------------------------------------------- S3


class S3SourceStore:
    """Objects under s3:// URIs through one boto3 client of the project's S3 configuration."""

    def __init__(self, access: S3Access, setting: str, credentials_from: str) -> None:
        self.access = access
        self.setting = setting  # the config key whose settings these are ("s3" or "sources[0].s3")
        self.credentials_from = credentials_from
        self._client: Any = None
        self._arrow: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3SourceStore({self.access.settings.describe()})"

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self.access.client()
            return self._client

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return bucket, key

    def _error(self, exc: Exception, uri: str) -> SourceReadError:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.setting} ({self.access.settings.describe()})"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket"):
                return SourceReadError("missing", uri, f"{uri}: no such object; fix the path (or the manifest row)")
            if code == "NoSuchBucket":
                return SourceReadError("missing", uri, f"{uri}: the bucket does not exist at {where}; fix the "
                                                       f"bucket name, or the endpoint in {self.setting}")
            if code in ("AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "ExpiredToken", "InvalidToken", "AllAccessDisabled") or status == 403:
                return SourceReadError("denied", uri, f"{uri}: access denied ({code or status}) with {where}; check "
                                                      f"the credentials ({self.credentials_from}) and the bucket's "
                                                      f"policy, or set {self.setting} for a corpus in another store")
            return SourceReadError("unreadable", uri, f"{uri}: S3 error {code or status} with {where}")
        if isinstance(exc, NoCredentialsError):
            return SourceReadError("denied", uri, f"{uri}: no S3 credentials found ({self.credentials_from}); "
                                                  f"set them, or {self.setting}")
        if isinstance(exc, BotoCoreError):
            return SourceReadError("unreadable", uri, f"{uri}: cannot reach S3 with {where} ({exc}); check the "
                                                      "endpoint and that the store is up")
        raise exc

    def stat(self, uri: str) -> Entry:
        bucket, key = self.split(uri)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - translated (or re-raised) by _error
            raise self._error(exc, uri) from None
        return Entry(uri, key.rsplit("/", 1)[-1], int(head.get("ContentLength", 0)), str(head.get("ETag", "")))

    def list(self, prefix: str) -> Iterator[Entry]:
        """Every object below `prefix` (a folder: a trailing `/` is implied), sorted by key."""
        bucket, key = self.split(prefix.rstrip("/"))
        start = f"{key}/" if key else ""
        paginator = self.client.get_paginator("list_objects_v2")
        found: list[Entry] = []
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    name = obj["Key"]
                    if name.endswith("/"):
                        continue  # a folder marker some tools write
                    found.append(Entry(f"s3://{bucket}/{name}", name[len(start):], int(obj.get("Size", 0)),
                                       str(obj.get("ETag", ""))))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, prefix) from None
        yield from sorted(found, key=lambda e: e.rel)

    def has_objects(self, prefix: str) -> bool:
        """Whether any object lies below `prefix` (a folder): one listing request for one key."""
        bucket, key = self.split(prefix.rstrip("/"))
        try:
            page = self.client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, prefix) from None
        return bool(page.get("Contents"))

    def arrow_filesystem(self) -> Any:
        """A pyarrow S3 filesystem with this store's settings and keys (Parquet sources), made once."""
        with self._lock:
            if self._arrow is None:
                self._arrow = self.access.arrow_filesystem()
            return self._arrow

    def read(self, uri: str, start: int | None = None, end: int | None = None,
             max_bytes: int | None = None) -> bytes:
        lo, hi = _check_range(uri, start, end)
        if hi is not None and hi == lo:
            return b""
        if max_bytes is not None:
            size = (hi - lo) if hi is not None else self.stat(uri).size - lo
            if size > max_bytes:
                raise _too_large(uri, size, max_bytes)
        bucket, key = self.split(uri)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if lo or hi is not None:
            kwargs["Range"] = f"bytes={lo}-{'' if hi is None else hi - 1}"
        try:
            body = self.client.get_object(**kwargs)["Body"]
            with body:
                data: bytes = body.read() if max_bytes is None else body.read(max_bytes + 1)
        except Exception as exc:  # noqa: BLE001
            if _invalid_range(exc):
                return b""  # a range starting at or past the end: nothing there
            raise self._error(exc, uri) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(uri, len(data), max_bytes)
        return data


def _invalid_range(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "InvalidRange"


# ---------------------------------------------------------------- HTTP


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same scheme, host and port: a source never silently reads
    from another server than the one its config names."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise SourceReadError("unreadable", req.full_url,
                                  f"{req.full_url}: the server redirects to {new.scheme}://{new.netloc}, another host; "
                                  "not followed: put the final URL in sources[].path (or the manifest)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@lru_cache(maxsize=1)
def _opener() -> urllib.request.OpenerDirector:
    # No ProxyHandler from the environment: sources are fetched from exactly the URL given.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _SameOriginRedirects())


class HttpSourceStore:
    """Files under http(s):// URLs: HEAD for size and version, GET with a Range header for reads."""

    setting = "sources[].path"

    def _request(self, uri: str, method: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(uri, method=method, headers=headers or {})
        try:
            return _opener().open(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                raise SourceReadError("missing", uri, f"{uri}: not found (HTTP {exc.code}); fix the URL "
                                                      "(or the manifest row)") from None
            if exc.code in (401, 403):
                raise SourceReadError("denied", uri, f"{uri}: access denied (HTTP {exc.code}); the server must "
                                                     "serve it without credentials (URLs with user:password@ "
                                                     "are refused)") from None
            if exc.code == 416:
                raise
            raise SourceReadError("unreadable", uri, f"{uri}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise SourceReadError("unreadable", uri, f"{uri}: cannot fetch ({exc.reason}); check the URL and "
                                                     "that the server is up") from None
        except OSError as exc:
            if isinstance(exc, SourceReadError):
                raise
            raise SourceReadError("unreadable", uri, f"{uri}: cannot fetch ({exc})") from None

    def stat(self, uri: str) -> Entry:
        with self._request(uri, "HEAD") as response:
            length = response.headers.get("Content-Length")
            version = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
        if length is None:
            raise SourceReadError("unreadable", uri, f"{uri}: the server states no Content-Length; serve it as "
                                                     "a plain file")
        return Entry(uri, uri.rsplit("/", 1)[-1], int(length), version)

    def list(self, prefix: str) -> Iterator[Entry]:
        raise SourceReadError("unreadable", prefix, f"{prefix}: an http(s):// source cannot be listed; point "
                                                    "sources[].path at a manifest (jsonl/csv/tsv) instead")

    def read(self, uri: str, start: int | None = None, end: int | None = None,
             max_bytes: int | None = None) -> bytes:
        lo, hi = _check_range(uri, start, end)
        if hi is not None and hi == lo:
            return b""
        ranged = bool(lo) or hi is not None
        headers = {"Range": f"bytes={lo}-{'' if hi is None else hi - 1}"} if ranged else {}
        try:
            response = self._request(uri, "GET", headers)
        except urllib.error.HTTPError:  # 416: the range starts at or past the end
            return b""
        with response:
            partial = response.status == 206
            length = response.headers.get("Content-Length")
            if ranged and not partial:  # the server ignored Range: slice the whole body, if small
                if length is not None and int(length) > MAX_UNRANGED_BYTES:
                    raise SourceReadError("unreadable", uri, f"{uri}: the server ignores Range requests and the "
                                                             f"file has {int(length):,} bytes; serve it from a "
                                                             "server with range support")
                body = response.read(MAX_UNRANGED_BYTES + 1)
                data = body[lo:hi]
            else:
                if max_bytes is not None and length is not None and int(length) > max_bytes:
                    raise _too_large(uri, int(length), max_bytes)
                data = response.read() if max_bytes is None else response.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(uri, len(data), max_bytes)
        return data


# ---------------------------------------------------------------- seekable reads


class RangeFile(io.RawIOBase):
    """A remote object as a seekable, read-only raw file: each read is one range read."""

    def __init__(self, store: SourceStore, uri: str, size: int) -> None:
        super().__init__()
        self.store, self.uri, self.size = store, uri, size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.pos >= self.size or not len(view):
            return 0
        end = min(self.size, self.pos + len(view))
        data = self.store.read(self.uri, self.pos, end)
        view[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_uri(uri: str, store: SourceStore | None = None, buffer_size: int = OPEN_BUFFER_BYTES) -> BinaryIO:
    """`uri` as a seekable binary file read by range requests (`readline`, `seek`, `tell` work)."""
    store = store or store_for(uri)
    size = store.stat(uri).size
    return io.BufferedReader(RangeFile(store, uri, size), buffer_size=buffer_size)  # type: ignore[return-value]


# ---------------------------------------------------------------- which store reads a URI


def _credentials(override: SourceS3Config | None, run: S3Config, setting: str) -> tuple[Any, str]:
    """(boto3 session or None for the run's chain, where the keys come from: for messages, no secret)."""
    import boto3

    if override is not None and override.access_key_id_env:
        key_var, secret_var = override.access_key_id_env, override.secret_access_key_env or ""
        missing = [v for v in (key_var, secret_var) if not os.environ.get(v)]
        if missing:
            raise SourceReadError("denied", setting, f"{setting}: the environment variable(s) {', '.join(missing)} "
                                                     f"named by {setting}.access_key_id_env / "
                                                     "secret_access_key_env are not set; set them")
        token = os.environ.get(override.session_token_env) if override.session_token_env else None
        session = boto3.session.Session(aws_access_key_id=os.environ[key_var],
                                        aws_secret_access_key=os.environ[secret_var], aws_session_token=token)
        return session, f"the keys in ${key_var} / ${secret_var} ({setting})"
    if override is not None and override.profile:
        return boto3.session.Session(profile_name=override.profile), f"AWS profile {override.profile!r} ({setting})"
    block = (override.credentials_block if override else None) or run.credentials_block
    if block:
        key = f"{setting}.credentials_block" if override and override.credentials_block else "s3.credentials_block"
        return None, f"the Prefect AwsCredentials block {block!r} ({key})"
    return None, "boto3's chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws"


def merged_s3(run: S3Config | None, override: SourceS3Config | None) -> S3Config:
    """The run's `s3` block with a source's override laid over it (set fields only)."""
    base = run or S3Config()
    if override is None:
        return base
    update = {k: v for k, v in override.model_dump().items()
              if v is not None and k in ("endpoint_url", "region", "addressing_style", "credentials_block")}
    return base.model_copy(update=update)


@lru_cache(maxsize=32)
def _s3_store(run_json: str, override_json: str | None, setting: str, _env: tuple[str | None, ...]) -> S3SourceStore:
    run = S3Config.model_validate_json(run_json)
    override = SourceS3Config.model_validate_json(override_json) if override_json else None
    config = merged_s3(run, override)
    session, creds = _credentials(override, run, setting)
    access = S3Access(config, session=session)
    return S3SourceStore(access, setting if override is not None else "s3", creds)


def _env_key() -> tuple[str | None, ...]:
    names = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
             "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
    return tuple(os.environ.get(n) for n in names)


def source_store(uri: str, run: S3Config | None = None, override: SourceS3Config | None = None,
                 setting: str = "sources[].s3") -> SourceStore:
    """The store for `uri`: S3 with the run's block merged with the source's override, or HTTP."""
    scheme = uri.partition("://")[0].lower()
    if scheme == "s3":
        return _s3_store((run or S3Config()).model_dump_json(), override.model_dump_json() if override else None,
                         setting, _env_key())
    if scheme in ("http", "https"):
        return HttpSourceStore()
    raise ValueError(f"{uri}: not an s3:// or http(s):// URI")


_REGISTERED: dict[str, SourceStore] = {}
_REGISTRY_LOCK = threading.Lock()


def register(prefix: str, store: SourceStore) -> None:
    """Read URIs below `prefix` with `store` (ingest registers each remote source root and allowed root,
    so the audio stage reads a clip with its source's settings). Process-local; the last one wins."""
    with _REGISTRY_LOCK:
        _REGISTERED[prefix.rstrip("/") + "/"] = store


def store_for(uri: str) -> SourceStore:
    """The registered store of the longest prefix holding `uri`, else the default one for its scheme."""
    with _REGISTRY_LOCK:
        matches = [p for p in _REGISTERED if f"{uri.rstrip('/')}/".startswith(p)]  # the prefix itself, or below
        if matches:
            return _REGISTERED[max(matches, key=len)]
    return source_store(uri)


def read(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object at `uri` (at most `max_bytes`: SourceReadError 'too_large' before any body is read)."""
    return store_for(uri).read(uri, max_bytes=max_bytes)


def read_range(uri: str, start: int, end: int | None = None) -> bytes:
    """Bytes [start, end) of the object at `uri` (to its end when `end` is None): one ranged request.

    For a slice of a long recording (segmentation): never reads the object whole."""
    return store_for(uri).read(uri, start, end)


def stat(uri: str) -> Entry:
    return store_for(uri).stat(uri)


def has_objects(prefix: str) -> bool:
    """Whether anything lies below the s3:// folder `prefix` (False for http(s)://: not listable)."""
    store = store_for(prefix)
    return isinstance(store, S3SourceStore) and store.has_objects(prefix)


def arrow_filesystem(uri: str) -> Any:
    """The pyarrow filesystem that reads the s3:// `uri` with its source's settings (the run's `s3`
    block merged with `sources[N].s3`, as registered by ingest)."""
    store = store_for(uri)
    if not isinstance(store, S3SourceStore):
        raise TypeError(f"{uri}: not an s3:// URI")
    return store.arrow_filesystem()


def listing(prefix: str) -> list[Entry]:
    """Every object below `prefix`, sorted by its key relative to `prefix`."""
    return list(store_for(prefix).list(prefix))


def join(base: str, rel: str) -> str:
    """`rel` resolved against the folder URI `base` (`..` folded), as a manifest's relative paths are."""
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest.rstrip('/'), rel))}"


def parent(uri: str) -> str:
    """The folder URI holding `uri` (no trailing slash)."""
    return uri.rstrip("/").rsplit("/", 1)[0]


__all__ = ["Entry", "HttpSourceStore", "RangeFile", "S3SourceStore", "SourceReadError", "SourceStore",
           "arrow_filesystem", "has_objects", "is_remote", "join", "listing", "merged_s3", "open_uri", "parent",
           "read", "read_range", "register", "source_store", "stat", "store_for"]
