"""storage/sources.py against real servers: a SeaweedFS S3 and an http.server on 127.0.0.1.

What is checked: listing (sorted keys, sizes, ETags), stat, range reads returning exactly the bytes
asked for, the size cap refusing before a body is read, a missing object and wrong credentials each
named with the URI and the setting (never the secret), HTTP redirects to another host refused, and
`open_uri` reading a manifest line by line through range requests only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import boto3
import pytest
from pydantic import ValidationError

from schemas.config import RunConfig, S3Config, SourceS3Config, parse_config
from storage import sources
from tests.support.seaweedfs import SeaweedS3

DATA = bytes(range(256)) * 40  # 10,240 bytes whose every offset is recognisable


class _Files(BaseHTTPRequestHandler):
    """Serves `files` (name → bytes) with Range support; records (method, path, Range) per request."""

    files: ClassVar[dict[str, bytes]] = {}
    log: ClassVar[list[tuple[str, str, str | None]]] = []
    redirect_to: str = ""
    honour_range = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _serve(self, body: bool) -> None:
        self.log.append((self.command, self.path, self.headers.get("Range")))
        if self.path == "/moved" and self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        status, payload = 200, data
        spec = self.headers.get("Range")
        if spec and self.honour_range:
            lo_text, _, hi_text = spec.removeprefix("bytes=").partition("-")
            lo, hi = int(lo_text), (int(hi_text) if hi_text else len(data) - 1)
            status, payload = 206, data[lo:hi + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", f'"{len(data)}-v1"')
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._serve(True)

    def do_HEAD(self) -> None:
        self._serve(False)


@pytest.fixture()
def http_files() -> Iterator[tuple[str, type[_Files]]]:
    handler = type("Files", (_Files,), {"files": {}, "log": [], "redirect_to": "", "honour_range": True})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_uri_helpers() -> None:
    assert sources.is_remote("s3://b/k") and sources.is_remote("HTTPS://h/x") and sources.is_remote("http://h/x")
    assert not sources.is_remote("/data/x.wav") and not sources.is_remote("file:///x") and not sources.is_remote(
        Path("s3://b/k"))  # pathlib folds the `//`: such a Path is a local path
    assert sources.join("s3://b/corpus", "audio/../audio/a.wav") == "s3://b/corpus/audio/a.wav"
    assert sources.join("http://127.0.0.1:8/c/", "a.wav") == "http://127.0.0.1:8/c/a.wav"
    assert sources.parent("s3://b/corpus/manifest.jsonl") == "s3://b/corpus"


def test_http_stat_range_reads_and_missing(http_files: tuple[str, type[_Files]]) -> None:
    base, handler = http_files
    handler.files["/c/data.bin"] = DATA
    store = sources.HttpSourceStore()
    entry = store.stat(f"{base}/c/data.bin")
    assert (entry.size, entry.version, entry.rel) == (len(DATA), '"10240-v1"', "data.bin")
    assert store.read(f"{base}/c/data.bin", 1000, 1010) == DATA[1000:1010]
    assert store.read(f"{base}/c/data.bin", 10_000) == DATA[10_000:]
    assert store.read(f"{base}/c/data.bin") == DATA
    assert ("GET", "/c/data.bin", "bytes=1000-1009") in handler.log  # a range request, not the whole file
    with pytest.raises(sources.SourceReadError) as missing:
        store.read(f"{base}/c/nope.wav")
    assert missing.value.problem == "missing" and f"{base}/c/nope.wav" in str(missing.value)
    with pytest.raises(sources.SourceReadError) as big:
        store.read(f"{base}/c/data.bin", max_bytes=100)
    assert big.value.problem == "too_large" and big.value.size == len(DATA) and "10,240 bytes" in str(big.value)


def test_http_server_without_range_support_is_sliced(http_files: tuple[str, type[_Files]]) -> None:
    base, handler = http_files
    handler.files["/d.bin"] = DATA
    handler.honour_range = False
    assert sources.HttpSourceStore().read(f"{base}/d.bin", 256, 260) == DATA[256:260]


def test_http_redirect_to_another_host_is_refused(http_files: tuple[str, type[_Files]]) -> None:
    base, handler = http_files
    handler.files["/c/data.bin"] = DATA
    handler.redirect_to = "http://127.0.0.2:9/elsewhere.bin"
    with pytest.raises(sources.SourceReadError) as refused:
        sources.HttpSourceStore().read(f"{base}/moved")
    assert "redirects to http://127.0.0.2:9, another host; not followed" in str(refused.value)
    handler.redirect_to = f"{base}/c/data.bin"  # same origin: followed
    assert sources.HttpSourceStore().read(f"{base}/moved", 0, 4) == DATA[:4]


def test_open_uri_reads_lines_by_ranges(http_files: tuple[str, type[_Files]]) -> None:
    base, handler = http_files
    lines = [f"row {i:05d} ".encode() + b"x" * 90 + b"\n" for i in range(300)]  # 30 KB
    handler.files["/m.jsonl"] = b"".join(lines)
    with sources.open_uri(f"{base}/m.jsonl", sources.HttpSourceStore(), buffer_size=4096) as f:
        assert f.readline() == lines[0]
        f.seek(len(lines[0]) * 250)
        assert f.readline() == lines[250]
        assert f.tell() == len(lines[0]) * 251
        assert f.read() == b"".join(lines[251:])
    gets = [r for r in handler.log if r[0] == "GET"]
    assert gets and all(r[2] is not None for r in gets)  # every body read was a range request
    assert len(gets) < 10  # a buffer per request, not a request per line


@pytest.fixture()
def corpus_bucket(seaweedfs: SeaweedS3, request: pytest.FixtureRequest) -> str:
    bucket = f"src-unit-{abs(hash(request.node.name)) % 10**8}"
    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region)
    client.create_bucket(Bucket=bucket)
    for key, body in {"c/b.bin": DATA, "c/a/one.wav": b"RIFF1", "c/a/.hidden": b"h", "other/x": b"x"}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


def test_s3_list_stat_and_range_reads(seaweedfs: SeaweedS3, corpus_bucket: str) -> None:
    store = sources.source_store(f"s3://{corpus_bucket}/c", S3Config(endpoint_url=seaweedfs.endpoint_url))
    entries = list(store.list(f"s3://{corpus_bucket}/c/"))
    assert [(e.rel, e.size) for e in entries] == [("a/.hidden", 1), ("a/one.wav", 5), ("b.bin", len(DATA))]
    assert entries[2].uri == f"s3://{corpus_bucket}/c/b.bin" and len(entries[2].version.strip('"')) == 32  # an MD5 ETag
    assert store.stat(f"s3://{corpus_bucket}/c/b.bin").version == entries[2].version
    assert store.read(f"s3://{corpus_bucket}/c/b.bin", 5000, 5100) == DATA[5000:5100]
    assert store.read(f"s3://{corpus_bucket}/c/b.bin", 10_200) == DATA[10_200:]
    with pytest.raises(sources.SourceReadError) as big:
        store.read(f"s3://{corpus_bucket}/c/b.bin", max_bytes=1024)
    assert big.value.problem == "too_large"
    with pytest.raises(sources.SourceReadError) as missing:
        store.read(f"s3://{corpus_bucket}/c/gone.wav")
    assert missing.value.problem == "missing" and f"s3://{corpus_bucket}/c/gone.wav: no such object" in str(missing.value)
    with pytest.raises(sources.SourceReadError) as no_bucket:
        store.stat("s3://no-such-bucket-here/x.wav")
    assert no_bucket.value.problem == "missing"


def test_s3_wrong_credentials_name_the_setting_not_the_secret(seaweedfs: SeaweedS3, corpus_bucket: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTHER_STORE_KEY", "not-a-key")
    monkeypatch.setenv("OTHER_STORE_SECRET", "wrong-secret-value")
    override = SourceS3Config(endpoint_url=seaweedfs.endpoint_url, access_key_id_env="OTHER_STORE_KEY",
                              secret_access_key_env="OTHER_STORE_SECRET")
    store = sources.source_store(f"s3://{corpus_bucket}/c", S3Config(), override, "sources[2].s3")
    with pytest.raises(sources.SourceReadError) as denied:
        store.read(f"s3://{corpus_bucket}/c/b.bin")
    text = str(denied.value)
    assert denied.value.problem == "denied"
    assert f"s3://{corpus_bucket}/c/b.bin: access denied" in text
    assert "$OTHER_STORE_KEY / $OTHER_STORE_SECRET (sources[2].s3)" in text and "wrong-secret-value" not in text
    monkeypatch.delenv("OTHER_STORE_SECRET")
    with pytest.raises(sources.SourceReadError, match="OTHER_STORE_SECRET named by sources\\[3\\].s3"):
        sources.source_store(f"s3://{corpus_bucket}/c", S3Config(), override, "sources[3].s3")


def test_registered_prefix_picks_the_store(seaweedfs: SeaweedS3, corpus_bucket: str) -> None:
    store = sources.source_store(f"s3://{corpus_bucket}/c", S3Config(endpoint_url=seaweedfs.endpoint_url))
    sources.register(f"s3://{corpus_bucket}/c", store)
    assert sources.store_for(f"s3://{corpus_bucket}/c/b.bin") is store
    assert sources.store_for(f"s3://{corpus_bucket}/cx/b.bin") is not store  # a prefix is a folder, not a string
    assert sources.read_range(f"s3://{corpus_bucket}/c/b.bin", 7, 9) == DATA[7:9]


def test_source_s3_override_config() -> None:
    config = parse_config({"sources": [{"path": "s3://b/c", "s3": {"endpoint_url": "http://127.0.0.1:9",
                                                                  "profile": "other"}}],
                           "s3": {"region": "eu-west-1"}}, environ={})
    assert isinstance(config, RunConfig) and config.sources[0].run_s3 == config.s3  # bound for ingest
    merged = sources.merged_s3(config.sources[0].run_s3, config.sources[0].s3)
    assert (merged.endpoint_url, merged.region) == ("http://127.0.0.1:9", "eu-west-1")
    plain = parse_config({"sources": [{"path": "s3://b/c"}]}, environ={})
    assert plain.config_hash() == parse_config({"sources": [{"path": "s3://b/c", "s3": None}]}, environ={}).config_hash()
    assert plain.config_hash() != parse_config({"sources": [{"path": "s3://b/c", "s3": {"region": "x"}}]},
                                               environ={}).config_hash()
    with pytest.raises(ValidationError, match="NAME of an environment variable"):
        SourceS3Config(access_key_id_env="AKIA/secret+key", secret_access_key_env="S")
    with pytest.raises(ValidationError, match="together"):
        SourceS3Config(access_key_id_env="K")
    with pytest.raises(ValueError, match="credentials inside the URL"):
        parse_config({"sources": [{"path": "http://user:pw@127.0.0.1/m.jsonl"}]}, environ={})
