"""`python -m ccoe_common.pb`: (re)generate the gRPC stubs; scripts/setup.sh runs it at install."""

import sys

from ccoe_common.pb.build import PACKAGE_DIR, generate

files = generate()
print(f"generated {len(files)} stub modules in {PACKAGE_DIR}", file=sys.stderr)
