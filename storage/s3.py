"""The one S3 configuration: endpoint, region, addressing and credentials, resolved once and handed
to every S3 client of the project (boto3, pyarrow, s3fs for HF `datasets`, DuckDB).

Why one place: left to themselves the libraries disagree. boto3 honours `AWS_ENDPOINT_URL` but
pyarrow's S3FileSystem does not, so a reader could take its manifest from the configured store and
its shards from AWS (another store, possibly with a same-named bucket). Every S3 client or
filesystem of the project is built here from one `S3Settings`.

Resolution, first found wins:
  endpoint   `s3.endpoint_url` → AWS_ENDPOINT_URL_S3 → AWS_ENDPOINT_URL → the AWS profile's
             `endpoint_url` (services section, then global) → AWS itself. AWS_IGNORE_CONFIGURED_ENDPOINT_URLS
             (env or profile) skips the environment and profile, as boto3 does.
  region     `s3.region` → AWS_REGION → AWS_DEFAULT_REGION → the credentials' region (Prefect block
             or AWS profile) → us-east-1.
  addressing `s3.addressing_style`; `auto` becomes `path` for a custom endpoint (what S3-compatible
             stores need and pyarrow does anyway) and `virtual` for AWS.
Credentials: a Prefect AwsCredentials block named by `s3.credentials_block` (storage/credentials.py),
else boto3's chain.
pyarrow, s3fs and DuckDB get the resolved keys only where they would not find them themselves
(a block, a chain step they lack; DuckDB always). Keys never reach logs, reprs or manifests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from schemas.config import S3Config

if TYPE_CHECKING:
    import pyarrow.fs

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
IGNORE_ENDPOINTS_VAR = "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"
DEFAULT_REGION = "us-east-1"
# boto3 credential methods whose source pyarrow's own (AWS C++ SDK) chain also reads; keys found any
# other way (a Prefect block is "explicit", an assumed role, …) are handed to pyarrow.
_PYARROW_FINDS_ITSELF = frozenset({"env", "shared-credentials-file", "config-file", "iam-role", "container-role",
                                   "assume-role-with-web-identity", "custom-process", "sso"})


class S3Settings(BaseModel):
    """Resolved, concrete S3 settings: what every client gets. Holds no secret."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None  # None: AWS's own endpoint for `region`
    region: str
    addressing_style: Literal["path", "virtual"]
    credentials_block: str | None = None
    max_attempts: int = 8
    endpoint_from: str = "default"  # where endpoint_url came from (for messages)

    def as_config(self) -> S3Config:
        """The same values as an `s3` config block (re-resolving it gives these settings back)."""
        return S3Config(endpoint_url=self.endpoint_url, region=self.region, addressing_style=self.addressing_style,
                        credentials_block=self.credentials_block, max_attempts=self.max_attempts)

    def describe(self) -> str:
        return (f"endpoint {self.endpoint_url or 'AWS'} (from {self.endpoint_from}), region {self.region}, "
                f"{self.addressing_style}-style")


@dataclass(frozen=True)
class ProfileDefaults:
    """What the AWS profile (or the credentials block) says, consulted after config and environment."""

    endpoint_url: str | None = None
    region: str | None = None
    ignore_configured_endpoints: bool = False


def _normalise_endpoint(url: str, source: str) -> str:
    text = url.strip().rstrip("/")
    if "://" not in text:
        text = f"https://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"S3 endpoint {url!r} from {source} is not usable: write http(s)://host[:port]")
    return text


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def resolve_s3(config: S3Config | S3Settings | None = None, *, environ: Mapping[str, str] | None = None,
               profile: ProfileDefaults | None = None) -> S3Settings:
    """Config, then environment, then profile, then defaults → S3Settings (see the module docstring).
    Settings already resolved come back unchanged."""
    if isinstance(config, S3Settings):
        return config
    cfg = config or S3Config()
    env = os.environ if environ is None else environ
    prof = profile or ProfileDefaults()
    endpoint, source = None, "default"
    if cfg.endpoint_url:
        endpoint, source = cfg.endpoint_url, "s3.endpoint_url"
    elif not (_truthy(env.get(IGNORE_ENDPOINTS_VAR)) or prof.ignore_configured_endpoints):
        found = next(((name, env[name]) for name in ENDPOINT_VARS if env.get(name)), None)
        if found is not None:
            source, endpoint = found
        elif prof.endpoint_url:
            endpoint, source = prof.endpoint_url, "AWS profile"
    if endpoint is not None:
        endpoint = _normalise_endpoint(endpoint, source)
    region = cfg.region or next((env[n] for n in REGION_VARS if env.get(n)), None) or prof.region or DEFAULT_REGION
    style = cfg.addressing_style
    if style == "auto":
        style = "path" if endpoint else "virtual"
    return S3Settings(endpoint_url=endpoint, region=region, addressing_style=style,
                      credentials_block=cfg.credentials_block, max_attempts=cfg.max_attempts, endpoint_from=source)


def boto3_session(credentials_block: str | None) -> Any:
    """Credentials from a Prefect `AwsCredentials` block when named, else boto3's usual chain (env first)."""
    import boto3

    if not credentials_block:
        return boto3.session.Session()
    from storage.credentials import block_session

    return block_session(credentials_block)


def _profile_defaults(session: Any) -> ProfileDefaults:
    """Endpoint, region and the ignore flag as boto3 would take them from the AWS config file."""
    from botocore.exceptions import BotoCoreError

    core = session._session  # boto3 keeps its botocore session here; public on botocore's side
    try:
        scoped = core.get_scoped_config()
        endpoint = scoped.get("endpoint_url")
        services = scoped.get("services")
        if services:
            section = core.full_config.get("services", {}).get(services, {}).get("s3", {})
            endpoint = section.get("endpoint_url") or endpoint
        ignore = _truthy(str(core.get_config_variable("ignore_configured_endpoint_urls") or ""))
    except BotoCoreError:  # a named profile that does not exist: boto3 fails later, naming it
        endpoint, ignore = None, False
    return ProfileDefaults(endpoint_url=endpoint, region=session.region_name, ignore_configured_endpoints=ignore)


@dataclass(frozen=True, repr=False)
class DuckDBSecret:
    """A DuckDB `CREATE SECRET` for the resolved settings. `str()`/`repr()` hide the keys; `sql()`
    holds them: execute it (`apply(con)`), never print or log it."""

    name: str
    options: tuple[tuple[str, str], ...]  # non-secret: TYPE, REGION, ENDPOINT, URL_STYLE, USE_SSL, SCOPE
    _keys: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def _statement(self, redact: bool) -> str:
        parts = [f"{k} {v}" for k, v in self.options]
        parts += [f"{k} {'***' if redact else _sql_str(v)}" for k, v in self._keys]
        return f"CREATE OR REPLACE SECRET {self.name} ({', '.join(parts)})"

    def sql(self) -> str:
        return self._statement(redact=False)

    def apply(self, con: Any) -> None:
        """Create the secret on a DuckDB connection (needs the httpfs extension installed)."""
        con.execute(self.sql())

    def __str__(self) -> str:
        return self._statement(redact=True)

    __repr__ = __str__


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class S3Access:
    """Resolved settings plus the boto3 session that goes with them: the only maker of S3 clients."""

    def __init__(self, config: S3Config | S3Settings | None = None, *,
                 environ: Mapping[str, str] | None = None, session: Any = None) -> None:
        """`session`: a boto3 session to use instead of the block/chain one (a source's own keys)."""
        block = config.credentials_block if config is not None else None
        self.session = session if session is not None else boto3_session(block)
        if isinstance(config, S3Settings):
            self.settings = config
        else:
            self.settings = resolve_s3(config, environ=environ, profile=_profile_defaults(self.session))

    def __repr__(self) -> str:
        return f"S3Access({self.settings.describe()})"

    # -- credentials (never logged) ------------------------------------------------------
    def _keys(self, *, always: bool = False) -> dict[str, str]:
        """access/secret/token when the consumer would not find them itself (or `always`)."""
        creds = self.session.get_credentials()
        if creds is None:
            return {}
        if not (always or self.settings.credentials_block or creds.method not in _PYARROW_FINDS_ITSELF):
            return {}
        frozen = creds.get_frozen_credentials()
        keys = {"access_key": frozen.access_key, "secret_key": frozen.secret_key}
        if frozen.token:
            keys["session_token"] = frozen.token
        return keys

    # -- clients -------------------------------------------------------------------------
    def client(self) -> Any:
        """A boto3 S3 client: endpoint, region, addressing and standard-mode retries from the settings."""
        from botocore.config import Config

        s = self.settings
        config = Config(region_name=s.region, s3={"addressing_style": s.addressing_style},
                        retries={"mode": "standard", "max_attempts": s.max_attempts},
                        connect_timeout=10, read_timeout=120, max_pool_connections=32)
        return self.session.client("s3", endpoint_url=s.endpoint_url, region_name=s.region, config=config)

    def arrow_filesystem(self) -> pyarrow.fs.S3FileSystem:
        """A pyarrow S3FileSystem with the same endpoint, region, addressing and (where needed) keys."""
        import pyarrow.fs as pafs

        s = self.settings
        kwargs: dict[str, Any] = {"region": s.region, "force_virtual_addressing": s.addressing_style == "virtual"}
        if s.endpoint_url:
            parts = urlsplit(s.endpoint_url)
            kwargs["endpoint_override"] = parts.netloc + parts.path
            kwargs["scheme"] = parts.scheme
        elif s.addressing_style == "path":  # pyarrow only does path style against an explicit endpoint
            kwargs["endpoint_override"] = f"s3.{s.region}.amazonaws.com"
        kwargs.update(self._keys())
        return pafs.S3FileSystem(**kwargs)

    def fsspec_options(self) -> dict[str, Any]:
        """`storage_options` for fsspec/s3fs (HF `datasets`). Carries keys only for a credentials
        block (s3fs reads boto3's chain itself): do not log the dict then."""
        s = self.settings
        client: dict[str, Any] = {"region_name": s.region}
        if s.endpoint_url:
            client["endpoint_url"] = s.endpoint_url
        opts: dict[str, Any] = {"client_kwargs": client, "config_kwargs": {"s3": {"addressing_style": s.addressing_style}}}
        keys = self._keys()
        if keys:
            opts.update(key=keys["access_key"], secret=keys["secret_key"])
            if "session_token" in keys:
                opts["token"] = keys["session_token"]
        return opts

    def duckdb_secret(self, name: str = "speechpairs", scope: str | None = None) -> DuckDBSecret:
        """DuckDB's S3 secret for these settings (DuckDB reads no AWS chain: keys always included)."""
        if not name.isidentifier():
            raise ValueError(f"DuckDB secret name {name!r}: use letters, digits and '_'")
        s = self.settings
        options = [("TYPE", "s3"), ("REGION", _sql_str(s.region)),
                   ("URL_STYLE", _sql_str("path" if s.addressing_style == "path" else "vhost"))]
        if s.endpoint_url:
            parts = urlsplit(s.endpoint_url)
            options += [("ENDPOINT", _sql_str(parts.netloc + parts.path)),
                        ("USE_SSL", "true" if parts.scheme == "https" else "false")]
        if scope:
            options.append(("SCOPE", _sql_str(scope)))
        keys = self._keys(always=True)
        secret = [("KEY_ID", keys["access_key"]), ("SECRET", keys["secret_key"])] if keys else []
        if "session_token" in keys:
            secret.append(("SESSION_TOKEN", keys["session_token"]))
        return DuckDBSecret(name, tuple(options), tuple(secret))


def _environment_key() -> tuple[str | None, ...]:
    names = (*ENDPOINT_VARS, *REGION_VARS, IGNORE_ENDPOINTS_VAR, "AWS_PROFILE", "AWS_CONFIG_FILE",
             "AWS_ACCESS_KEY_ID", "AWS_SHARED_CREDENTIALS_FILE")
    return tuple(os.environ.get(n) for n in names)


@lru_cache(maxsize=8)
def _cached_filesystem(config_json: str, _env: tuple[str | None, ...]) -> pyarrow.fs.S3FileSystem:
    return S3Access(S3Config.model_validate_json(config_json)).arrow_filesystem()


def shared_arrow_filesystem(config: S3Config | None = None) -> pyarrow.fs.S3FileSystem:
    """One pyarrow S3 filesystem per (config, AWS environment), for readers that open many files
    without a store (ingest sources): building one per file would cost a client each time."""
    return _cached_filesystem((config or S3Config()).model_dump_json(), _environment_key())
