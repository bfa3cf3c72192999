"""Requests with one large header, sent as a network delivers them: in segments.

uvicorn's h11 parser (the image's CMD and `make serve` pick it) refuses a request whose line
and headers outgrow `--h11-max-incomplete-event-size` before they are complete: it answers
400 and closes the connection. It checks between reads, so the segments here come with a
pause, and a client still sending when the server has answered stops and reads the answer.
"""

from __future__ import annotations

import select
import socket

SEGMENT = 16 * 1024
PAUSE_S = 0.2  # pacing between segments, not a bound on anything
HEADER_CAP = 32 * 1024  # the CMD's --h11-max-incomplete-event-size


def status_with_header(port: int, header_bytes: int, host: str = "127.0.0.1") -> int | None:
    """The status of `GET /healthz` with an `X-Padding` header of `header_bytes`, or None
    when the server closed the connection without an answer."""
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Padding: "
        + b"a" * header_bytes + b"\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=30) as sock:
        try:
            for start in range(0, len(request), SEGMENT):
                sock.sendall(request[start : start + SEGMENT])
                readable, _, _ = select.select([sock], [], [], PAUSE_S)
                if readable:
                    break
            answer = sock.recv(4096)
        except (BrokenPipeError, ConnectionResetError):
            return None
    if not answer:
        return None
    return int(answer.split(b" ", 2)[1])
