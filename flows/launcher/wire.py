"""The launcher's wire format: 4-byte length + JSON, file descriptors passed alongside (SCM_RIGHTS)."""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from typing import Any

_MAX_MESSAGE = 1 << 20


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    data = struct.pack("!I", len(body)) + body
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        data, ancdata, _flags, _addr = sock.recvmsg(n - got, socket.CMSG_SPACE(3 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data:
            return None
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv(sock: socket.socket, fds: list[int] | None = None) -> dict[str, Any] | None:
    """One message (None at EOF); file descriptors that came with it are appended to `fds`."""
    received: list[int] = []
    header = _recv_exact(sock, 4, received)
    body = None
    if header is not None:
        (length,) = struct.unpack("!I", header)
        body = _recv_exact(sock, length, received) if length <= _MAX_MESSAGE else None
    if fds is None:
        for fd in received:
            os.close(fd)
    else:
        fds.extend(received)
    if body is None:
        return None
    message = json.loads(body)
    return message if isinstance(message, dict) else None
