"""`ccoe auth token`: a fresh token each time, and a tokens-file line that authenticates it."""

from __future__ import annotations

import json

from ccoe_common.auth.config import AuthConfig
from ccoe_common.auth.guard import Guard
from ccoe_common.auth.tokens import token_hash
from ccoe_common.cli.main import main


def test_minted_token_and_its_line_work_together(tmp_path, capsys):
    assert main(["auth", "token", "--name", "ops-alice", "--role", "admin", "--role", "inference",
                 "--tenant", "acme", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sha256"] == token_hash(out["token"]) and out["token"].startswith("ccoe_")
    assert (out["roles"], out["tenants"]) == (["admin", "inference"], ["acme"])
    path = tmp_path / "tokens.yaml"
    path.write_text(out["tokens_file_line"] + "\n")
    guard = Guard(AuthConfig(mode="token", tokens_file=str(path)))
    principal = guard.check("ccoe.v1.Registry/PushExpert", {"authorization": f"Bearer {out['token']}"})
    assert principal.name == "ops-alice" and principal.tenants == ("acme",)
    assert main(["auth", "token", "--name", "ops-alice", "--role", "admin", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token"] != out["token"]


def test_human_output_and_a_bad_name(capsys):
    assert main(["auth", "token", "--name", "app", "--role", "inference"]) == 0
    text = capsys.readouterr().out
    assert "shown once" in text and "- {name: app, sha256: " in text
    assert main(["auth", "token", "--name", "bad name", "--role", "admin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--name 'bad name'" in err[0]
