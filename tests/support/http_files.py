"""A static file server on 127.0.0.1 with Range support that records every request, for remote-source tests."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

RequestLog = list[tuple[str, str, str | None]]  # (method, path, Range header or None)


class _RangeFiles(SimpleHTTPRequestHandler):
    log: ClassVar[RequestLog] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self) -> Any:
        self.log.append((self.command, self.path, self.headers.get("Range")))
        spec = self.headers.get("Range")
        if not spec:
            return super().send_head()
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        size = path.stat().st_size
        lo_text, _, hi_text = spec.removeprefix("bytes=").partition("-")
        lo, hi = int(lo_text), min(int(hi_text) if hi_text else size - 1, size - 1)
        with path.open("rb") as f:
            f.seek(lo)
            data = f.read(hi + 1 - lo)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {lo}-{hi}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)


@contextmanager
def serve_files(directory: Path) -> Iterator[tuple[str, RequestLog]]:
    """`directory` over HTTP: yields the base URL and the live request log; stops the server on exit."""
    log: RequestLog = []
    handler: Any = type("Logged", (_RangeFiles,), {"log": log})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
