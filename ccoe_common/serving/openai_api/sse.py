"""Server-sent events as OpenAI's API sends them: one `data: <json>` event per chunk, a blank
line after each, and `data: [DONE]` last. An error after the stream began is one event whose
object is `{"error": {...}}` (the openai SDKs raise it as an APIError), then `[DONE]`."""

from __future__ import annotations

import json
from typing import Any

MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    """One SSE event, e.g. event({"a": 1}) -> b'data: {"a":1}\\n\\n'."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
