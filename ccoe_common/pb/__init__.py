"""Generated gRPC stubs for proto/ccoe/v1 (see build.py). Importing this package regenerates
them when they are missing or older than their .proto in a source checkout."""

from ccoe_common.pb import build as _build

if _build.PROTO_ROOT.exists() and _build.is_stale():
    _build.generate()
