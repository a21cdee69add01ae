"""A loopback HTTP relay that lets ffmpeg read one remote object without its URL or credentials.

ffmpeg (and ffprobe) get `http://127.0.0.1:<port>/<random token>` instead of an s3:// or http(s)://
URL: the relay serves that one object for the duration of one call, with Range support, and every
byte it serves is a range read through storage/sources.py (so the source's S3 settings, redirect
and proxy rules apply), `RELAY_CHUNK_BYTES` at a time as the client takes them. ffmpeg seeks with
HTTP Range requests, so MP3 spans and M4A/MP4 with the index (moov) at the end work as they do for
local files. Kept apart from tasks/segment/blocks.py: this is an HTTP server, not audio reading.
"""

from __future__ import annotations

import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from storage import sources as stores

RELAY_CHUNK_BYTES = 1 << 20  # the relay's range GETs: at most this much held per request

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Relay:
    """One remote object served on 127.0.0.1 under a random path, with Range support, every byte
    read through the object's SourceStore in `RELAY_CHUNK_BYTES` range reads as the client takes
    them (a client that seeks closes the connection and the rest is never fetched)."""

    def __init__(self, store: stores.SourceStore, uri: str, size: int) -> None:
        self.store, self.uri, self.size = store, uri, size
        self.error: stores.SourceReadError | None = None
        self.path = f"/{secrets.token_urlsafe(18)}"
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                relay.serve(self, body=False)

            def do_GET(self) -> None:
                relay.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="speechpairs-relay", daemon=True)
        self.thread.start()

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        if handler.path != self.path:
            handler.send_error(404)
            return
        lo, hi = 0, self.size
        spec = handler.headers.get("Range")
        match = _RANGE.fullmatch(spec.strip()) if spec else None
        if match is not None and (match.group(1) or match.group(2)):
            if match.group(1):
                lo = int(match.group(1))
                hi = min(self.size, int(match.group(2)) + 1) if match.group(2) else self.size
            else:
                lo = max(0, self.size - int(match.group(2)))
            if lo >= self.size or hi <= lo:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{self.size}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{self.size}")
        else:
            handler.send_response(200)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(hi - lo))
        handler.end_headers()
        pos = lo
        while body and pos < hi:
            try:
                data = self.store.read(self.uri, pos, min(hi, pos + RELAY_CHUNK_BYTES))
            except stores.SourceReadError as exc:
                self.error = exc
                return
            if not data:
                self.error = stores.SourceReadError(
                    "unreadable", self.uri, f"{self.uri}: the object ended at byte {pos:,} of the {self.size:,} "
                                            "it had when opened; it changed while being read: run again")
                return
            try:
                handler.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client seeked or finished: nothing more is fetched
            pos += len(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
