"""Shared by the WebSocket /v1/stream tests."""

from __future__ import annotations

from typing import Any


def replies_in_lockstep(ws: Any, frames: list[bytes]) -> list[dict[str, Any]]:
    """Send each frame only after the previous one is answered, so none is dropped; the
    replies, checked to come in order with nothing dropped."""
    replies = []
    for index, frame in enumerate(frames):
        ws.send_bytes(frame)
        reply = ws.receive_json()
        assert reply["frame"] == index and reply["dropped"] == 0, reply
        replies.append(reply)
    return replies
