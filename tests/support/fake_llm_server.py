"""A scripted OpenAI-compatible chat server on 127.0.0.1 for testing the LLM backends.

Each request is keyed by a `clip=<id>` marker in its messages. `server.scripts[id]` is a list of
actions answered in turn (the last one repeats); ids without a script get `default` (["ok"]). Actions:
  ok          200 with a normal completion
  500 / 503   that status, body echoes the Authorization header (to catch leaks into errors)
  400         400, body echoes the Authorization header
  429         429 with Retry-After: 0;  "429ra<N>" sends Retry-After: <N>
  sleep       wait `sleep_s` (past the client timeout), then answer ok
  malformed   200 with a body that is not JSON
  nochoices   200 with JSON lacking "choices"
  empty       200 with empty content
  drop        close the connection without answering

Counters for load-spreading and limit tests: `seen` (every answered request, so `len(seen)` is the
replica's request count), `in_flight` / `max_in_flight` (requests being processed; a request
leaves before its answer is written, so a client that sends the next one right after reading an
answer is never counted twice), `connections` (accepted so far). `fail_after=N` makes the replica
die after N requests: every later request is counted in `refused` and its connection dropped
unanswered (a replica crashing mid-run); `stop()` makes it refuse connections outright.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIP_RE = re.compile(r"clip=([A-Za-z0-9_.:/-]+)")


@dataclass
class Seen:
    clip: str | None
    action: str
    headers: dict[str, str]
    body: Any
    at: float


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops connections beyond it when many requests open at once,
    # and the client's SYN retry then adds a whole second: keep room for hundreds in flight.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client that timed out and closed its connection is not a server error
        super().handle_error(request, client_address)


@dataclass
class FakeLLMServer:
    scripts: dict[str, list[str]] = field(default_factory=dict)
    default: list[str] = field(default_factory=lambda: ["ok"])  # for ids without a script (e.g. ["503"]: down)
    sleep_s: float = 2.0
    ok_delay_s: float = 0.0
    model: str = "fake-served-model"
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    fail_after: int | None = None
    refused: int = 0
    connections: int = 0
    _counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> FakeLLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def setup(self) -> None:
                with server._lock:
                    server.connections += 1
                super().setup()

            def do_POST(self) -> None:
                server._handle(self)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers that are "sleeping past the timeout"
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def requests_for(self, clip: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.clip == clip]

    # -- request handling -------------------------------------------------------------------------
    def _next_action(self, clip: str | None) -> str:
        with self._lock:
            script = self.scripts.get(clip or "", self.default)
            n = self._counts.get(clip or "", 0)
            self._counts[clip or ""] = n + 1
            return script[min(n, len(script) - 1)]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        h._fake_in_flight = True  # type: ignore[attr-defined]
        try:
            self._respond(h)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before we answered
        finally:
            self._leave(h)

    def _leave(self, h: BaseHTTPRequestHandler) -> None:
        """Stop counting a request as in flight (once), just before its answer goes out."""
        if getattr(h, "_fake_in_flight", False):
            h._fake_in_flight = False  # type: ignore[attr-defined]
            with self._lock:
                self.in_flight -= 1

    def _drop(self, h: BaseHTTPRequestHandler) -> None:
        self._leave(h)
        h.close_connection = True
        h.connection.shutdown(2)

    def _respond(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        messages = body.get("messages", []) if isinstance(body, dict) else []
        m = CLIP_RE.search(" ".join(str(msg.get("content", "")) for msg in messages if isinstance(msg, dict)))
        clip = m.group(1) if m else None
        if h.path != "/v1/chat/completions":
            self._send(h, 404, b'{"error": "not found"}')
            return
        with self._lock:
            dead = self.fail_after is not None and len(self.seen) >= self.fail_after
            if dead:
                self.refused += 1
        if dead:
            self._drop(h)
            return
        action = self._next_action(clip)
        with self._lock:
            self.seen.append(Seen(clip, action, dict(h.headers.items()), body, time.monotonic()))
        auth = h.headers.get("Authorization", "")
        if action == "ok":
            if self.ok_delay_s:
                self._stop.wait(self.ok_delay_s)
            self._send(h, 200, self._completion(clip, body, f"Response for {clip}."))
        elif action in ("500", "503", "400"):
            self._send(h, int(action), json.dumps({"error": f"boom ({auth})"}).encode())
        elif action.startswith("429"):
            retry_after = action[len("429ra"):] if action.startswith("429ra") else "0"
            self._send(h, 429, b'{"error": "slow down"}', {"Retry-After": retry_after})
        elif action == "sleep":
            self._stop.wait(self.sleep_s)
            self._send(h, 200, self._completion(clip, body, "too late"))
        elif action == "malformed":
            self._send(h, 200, b'{"choices": [{"message": {"content": "trunc')
        elif action == "nochoices":
            self._send(h, 200, b'{"object": "chat.completion", "model": "x"}')
        elif action == "empty":
            self._send(h, 200, self._completion(clip, body, ""))
        elif action == "drop":
            self._drop(h)
        else:
            raise AssertionError(f"unknown action {action!r}")

    def _completion(self, clip: str | None, body: Any, content: str) -> bytes:
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        return json.dumps({
            "id": f"cmpl-{clip}",
            "object": "chat.completion",
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(content.split()),
                      "total_tokens": prompt_words + len(content.split())},
        }).encode()

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: bytes,
              headers: dict[str, str] | None = None) -> None:
        self._leave(h)
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)
        h.wfile.flush()
