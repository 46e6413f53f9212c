"""Entry point of the `ccoe` command. Each subcommand lives in its own module of this package
and registers itself with `register(subparsers)`; handlers return the process exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import grpc

from ccoe_common.cli import audit, auth, bench, cluster, demo, expert, generate, rollout, rules, serve, train
from ccoe_common.cli.registry_ops import add_cluster_flags, rpc_error_exit, through_cluster
from ccoe_common.console import UserError
from ccoe_common.errors import CCoEError
from ccoe_common.settings import load_settings

COMMANDS = (demo, serve, generate, expert, rollout, rules, audit, bench, train, cluster, auth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccoe", description="CCoE Serve: one backbone, many co-resident experts.")
    add_cluster_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        with through_cluster(args):
            return int(args.handler(args) or 0)
    except (UserError, CCoEError, ValueError, LookupError, FileNotFoundError) as e:
        # Expected, user-facing failures (bad path, bad artifact, unknown expert): one clear
        # line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"ccoe {args.command}: error: {e}", file=sys.stderr)
        return 1 if getattr(e, "retryable", False) else 2
    except grpc.RpcError as e:
        # The registry's answer (NOT_FOUND, INVALID_ARGUMENT, ABORTED...) already names what was
        # wrong; the status code tells scripts whether to retry.
        return rpc_error_exit(args, e)


if __name__ == "__main__":
    sys.exit(main())
