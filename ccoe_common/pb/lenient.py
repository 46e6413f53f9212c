"""Deserializing requests without raising: bytes that are not a valid message become an
`Undecodable`, which the gRPC edge answers with INVALID_ARGUMENT (grpcio would answer UNKNOWN)
and the upload receiver refuses chunk by chunk. It lives beside the stubs, below every layer
that meets a request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not a valid `message` (e.g. "ccoe.v1.GenerateRequest"). `reason`
    is what the caller is told, e.g. "is not a valid ccoe.v1.GenerateRequest: Error parsing
    message with type 'ccoe.v1.GenerateRequest': String field had bad UTF-8"."""

    message: str
    reason: str


def lenient(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A request deserializer that never raises: undecodable bytes become an Undecodable."""
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Undecodable(name, f"is not a valid {name}: {e}; send the message the .proto defines, "
                                     "with UTF-8 text in string fields")

    return deserialize
