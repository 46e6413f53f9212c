"""Generate the Python gRPC stubs from proto/ (run at install: `python -m ccoe_common.pb`).

Stubs are never committed. They are generated with the grpc_tools installed next to the
protobuf runtime, so generated code and runtime always agree on the protobuf version (the
generated modules refuse to import otherwise). Output: ccoe_common/pb/<name>_pb2.py, its type
stub <name>_pb2.pyi and <name>_pb2_grpc.py for every proto/ccoe/v1/<name>.proto, imports
rewritten to this package.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent.parent / "proto"
PROTO_PACKAGE = "ccoe/v1"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / PROTO_PACKAGE).glob("*.proto"))


def is_stale(root: Path = PROTO_ROOT, out: Path = PACKAGE_DIR) -> bool:
    """True when a stub is missing or older than its .proto (only checkable in a source tree)."""
    for proto in proto_files(root):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            stub = out / f"{proto.stem}{suffix}"
            if not stub.exists() or stub.stat().st_mtime < proto.stat().st_mtime:
                return True
    return False


def generate(root: Path = PROTO_ROOT, out: Path = PACKAGE_DIR) -> list[Path]:
    from grpc_tools import protoc

    protos = proto_files(root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {root / PROTO_PACKAGE}")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *[str(p.relative_to(root)) for p in protos]]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
        written = []
        # The .pyi stubs give type checkers the message classes (protoc's .py builds them at run time).
        for src in sorted((Path(tmp) / PROTO_PACKAGE).glob("*.py*")):
            code = re.sub(r"^from ccoe\.v1 import ", "from ccoe_common.pb import ", src.read_text(), flags=re.M)
            # Message classes carry the module name protoc derived from the .proto path; it
            # must name this package or pickling (Ray passes messages between processes) fails.
            code = re.sub(r"'ccoe\.v1\.(\w+_pb2)'", r"'ccoe_common.pb.\1'", code)
            # Write then rename, so a concurrent importer never sees half a module.
            fd, part = tempfile.mkstemp(dir=out, suffix=".part")
            with os.fdopen(fd, "w") as f:
                f.write(code)
            dest = out / src.name
            shutil.move(part, dest)
            written.append(dest)
    return written

