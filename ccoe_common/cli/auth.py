"""`ccoe auth token`: mint a bearer token for one principal.

    ccoe auth token --name ops-alice --role admin
    token (shown once; give it to ops-alice, e.g. as CCOE_TOKEN):
      ccoe_Yc3...
    add this line to the tokens file (auth.tokens_file):
      - {name: ops-alice, sha256: 3c9a...e1, roles: [admin]}

Only the hash goes into the tokens file; the server never stores the token itself.
"""

from __future__ import annotations

import argparse

from ccoe_common.auth.tokens import ROLES, TokenEntry, mint_token, token_hash
from ccoe_common.console import UserError, add_json_flag, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("auth", help="credentials: mint tokens for the tokens file")
    auth_sub = p.add_subparsers(dest="auth_command", required=True, metavar="SUBCOMMAND")
    t = auth_sub.add_parser("token", help="mint a random token; prints it once and the tokens-file line for it")
    t.add_argument("--name", required=True, help="the principal's name, as the audit log shows it (e.g. ops-alice)")
    t.add_argument("--role", action="append", choices=ROLES, required=True,
                   help="a role to grant (repeat for several; roles do not imply each other)")
    t.add_argument("--tenant", action="append", default=[],
                   help="bind the token to this tenant (repeat for several; the first is the default)")
    add_json_flag(t)
    t.set_defaults(handler=token)


def token(args: argparse.Namespace) -> int:
    secret = mint_token()
    try:
        entry = TokenEntry(name=args.name, sha256=token_hash(secret), roles=tuple(dict.fromkeys(args.role)),
                           tenants=tuple(dict.fromkeys(args.tenant)))
    except ValueError as e:
        raise UserError(f"--name {args.name!r}: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}") from None
    if args.json:
        print_json({"name": entry.name, "token": secret, "sha256": entry.sha256, "roles": list(entry.roles),
                    "tenants": list(entry.tenants), "tokens_file_line": entry.line()})
        return 0
    print(f"token (shown once; give it to {entry.name}, e.g. as CCOE_TOKEN):\n  {secret}")
    print(f"add this line to the tokens file (auth.tokens_file):\n  {entry.line()}")
    print("the server re-reads the tokens file within a second of a change; no restart needed")
    return 0
