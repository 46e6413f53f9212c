"""`python -m ccoe_common.bench throughput|memory ...`: the two model benchmarks of `ccoe bench`,
with the same flags and output, for machines that have torch and transformers but not the
whole stack.

The `ccoe` command imports every command module, and with them Ray, Redis, RE2 and the
Kubernetes client; a bare GPU machine (scripts/gpu-check.sh) has none of those. These two
benchmarks need only torch, transformers, peft and pydantic (the engine's config), so this
entry point registers nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ccoe_common.bench import memory, throughput
from ccoe_common.console import UserError


def add_model_benchmarks(kinds: argparse._SubParsersAction) -> None:
    """`memory` and `throughput`, as `ccoe bench` and this entry point both offer them."""
    p = kinds.add_parser("memory", help="resident memory: CCoE vs n separate models vs n LoRA adapters")
    memory.add_arguments(p)
    p.set_defaults(handler=memory.run)
    p = kinds.add_parser("throughput", help="tokens/s: CCoE vs bare backbone, multi-LoRA and separate models")
    throughput.add_arguments(p)
    p.set_defaults(handler=throughput.run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccoe_common.bench",
                                     description="the model benchmarks of `ccoe bench`, without the service stack")
    add_model_benchmarks(parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK"))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UserError, ValueError) as e:
        print(f"ccoe bench {args.bench}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
