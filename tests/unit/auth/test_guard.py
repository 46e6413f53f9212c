"""Tokens, roles, tenants and rate limits at the edge, without a server (the same checks
behind real gRPC are in tests/integration/test_auth.py)."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest

from ccoe_common.auth.config import AuthConfig
from ccoe_common.auth.errors import PermissionDenied, RateLimited, TokensFileError, Unauthenticated
from ccoe_common.auth.guard import METHOD_ROLES, Guard, bearer_token
from ccoe_common.auth.ratelimit import RateLimit, RateLimiter
from ccoe_common.auth.tokens import TokenEntry, TokenTable, mint_token, token_hash

PUSH = "ccoe.v1.Registry/PushExpert"
GEN = "ccoe.v1.Inference/Generate"
WATCH = "ccoe.v1.Registry/WatchDesiredState"


def write_tokens(path, entries: list[tuple[str, str, list[str], list[str]]]) -> None:
    path.write_text("".join(TokenEntry(name=n, sha256=token_hash(t), roles=r, tenants=ten).line() + "\n"
                            for n, t, r, ten in entries))


@pytest.fixture()
def tokens(tmp_path):
    path = tmp_path / "tokens.yaml"
    write_tokens(path, [("ops", "tok-admin", ["admin"], []), ("app", "tok-app", ["inference"], ["acme", "beta"]),
                        ("both", "tok-both", ["admin", "inference"], []), ("rep", "tok-rep", ["replica"], [])])
    return path


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_hash_is_sha256_of_utf8_and_minted_tokens_differ():
    assert token_hash("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    a, b = mint_token(), mint_token()
    assert a != b and a.startswith("ccoe_") and len(a) > 40


def test_roles_are_separate_and_do_not_imply_each_other(tokens):
    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens)))
    assert guard.check(PUSH, auth("tok-admin")).name == "ops"
    assert guard.check(GEN, auth("tok-app")).name == "app"
    assert guard.check(WATCH, auth("tok-rep")).name == "rep"
    assert guard.check(PUSH, auth("tok-both")).name == guard.check(GEN, auth("tok-both")).name == "both"
    for method, token in [(PUSH, "tok-app"), (GEN, "tok-admin"), (WATCH, "tok-admin"), (PUSH, "tok-rep"),
                          (GEN, "tok-rep"), (WATCH, "tok-app")]:
        with pytest.raises(PermissionDenied, match=f"needs role '{METHOD_ROLES[method]}'") as err:
            guard.check(method, auth(token))
        assert err.value.code == "PERMISSION_DENIED"


@pytest.mark.parametrize("metadata, message", [
    ({}, "no credential"),
    ({"authorization": "Bearer wrong"}, "matches no principal"),
    ({"authorization": "Basic dG9rLWFkbWlu"}, "must be 'Bearer <token>'"),
    ({"authorization": "Bearer "}, "must be 'Bearer <token>'"),
    ({"authorization": "Bearer " + "x" * 600}, "at most 512"),
])
def test_missing_or_wrong_tokens_are_unauthenticated(tokens, metadata, message):
    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens)))
    with pytest.raises(Unauthenticated, match=message) as err:
        guard.check(PUSH, metadata)
    assert err.value.code == "UNAUTHENTICATED" and not err.value.retryable


def test_every_method_of_both_services_has_a_role():
    from ccoe_common.pb import inference_pb2, registry_pb2

    names = {f"{s.full_name}/{m.name}" for mod in (inference_pb2, registry_pb2)
             for s in mod.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert names == set(METHOD_ROLES)


def test_mode_none_lets_everyone_in_and_a_missing_section_is_refused():
    guard = Guard(AuthConfig(mode="none"))
    assert guard.check(PUSH, {}).name == "anonymous"
    with pytest.raises(ValueError, match="no auth section: choose `auth: {mode: token"):
        Guard.from_config(None)


def test_tenant_bound_tokens_act_only_as_their_tenants(tokens):
    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens)))
    app = guard.check(GEN, auth("tok-app"))
    assert guard.tenant_for(app, None) == "acme"
    assert guard.tenant_for(app, "beta") == "beta"
    with pytest.raises(PermissionDenied, match="may act as tenant"):
        guard.tenant_for(app, "evil")
    both = guard.check(GEN, auth("tok-both"))
    assert guard.tenant_for(both, "anyone") == "anyone" and guard.tenant_for(both, None) is None


def test_replica_credential_from_its_own_file(tokens, tmp_path):
    rep = tmp_path / "replica-token"
    rep.write_text("tok-internal\n")
    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens), replica_token_file=str(rep)))
    assert guard.check(WATCH, auth("tok-internal")).roles == frozenset({"replica"})
    with pytest.raises(PermissionDenied):
        guard.check(PUSH, auth("tok-internal"))


def test_rotation_picks_up_a_changed_file_and_keeps_the_old_table_on_a_broken_one(tokens, monkeypatch):
    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens)))
    write_tokens(tokens, [("ops2", "tok-new", ["admin"], [])])
    os.utime(tokens, (1, 1))  # a different mtime, however fast this runs
    monkeypatch.setattr(guard, "_next_check", 0.0)
    assert guard.check(PUSH, auth("tok-new")).name == "ops2"
    with pytest.raises(Unauthenticated):
        guard.check(PUSH, auth("tok-admin"))  # revoked by the rotation
    tokens.write_text("- {name: broken")
    os.utime(tokens, (2, 2))
    monkeypatch.setattr(guard, "_next_check", 0.0)
    assert guard.check(PUSH, auth("tok-new")).name == "ops2"


@pytest.mark.parametrize("text, message", [
    ("{a: 1}", "must be a YAML list"),
    ("- {name: a, sha256: abc, roles: [admin]}", "sha256: Value error, must be 64 lowercase hex"),
    (f"- {{name: a, sha256: {'A' * 64}, roles: [admin]}}", "sha256"),
    (f"- {{name: a, sha256: {'a' * 64}, roles: [root]}}", "roles.0"),
    (f"- {{name: a, sha256: {'a' * 64}, roles: []}}", "roles"),
    (f"- {{name: a, sha256: {'a' * 64}, roles: [admin]}}\n- {{name: a, sha256: {'b' * 64}, roles: [admin]}}",
     "appears twice"),
    (f"- {{name: a, sha256: {'a' * 64}, roles: [admin]}}\n- {{name: b, sha256: {'a' * 64}, roles: [admin]}}",
     "same token hash"),
    (f"- {{name: a, sha256: {'a' * 64}, roles: [admin], token: x}}", "Extra inputs"),
])
def test_malformed_tokens_files_name_the_entry(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TokensFileError, match=message):
        TokenTable.from_file(path)
    with pytest.raises(TokensFileError):
        Guard(AuthConfig(mode="token", tokens_file=str(path)))


def test_rate_limit_is_a_token_bucket_per_principal():
    now = [0.0]
    limiter = RateLimiter(RateLimit(requests_per_s=2, burst=3), clock=lambda: now[0])
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(RateLimited, match="over its rate limit of 2 requests/s") as err:
        limiter.take("a")
    assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.retryable
    assert err.value.retry_after_s == pytest.approx(0.5)
    limiter.take("b")  # another principal's budget is its own
    now[0] = 0.5
    limiter.take("a")  # one token refilled
    with pytest.raises(RateLimited):
        limiter.take("a")
    again = pickle.loads(pickle.dumps(err.value))
    assert (type(again), again.retry_after_s, str(again)) == (RateLimited, err.value.retry_after_s, str(err.value))


def test_rate_limit_applies_to_callers_not_to_the_replica_role(tokens):
    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens), rate_limit={"requests_per_s": 0.001, "burst": 1}))
    guard.check(GEN, auth("tok-app"))
    with pytest.raises(RateLimited):
        guard.check(GEN, auth("tok-app"))
    for _ in range(3):
        guard.check(WATCH, auth("tok-rep"))


def test_bearer_parsing():
    assert bearer_token({}) is None
    assert bearer_token({"authorization": "bearer  abc "}) == "abc"


def test_session_tokens_add_to_the_configured_ones_and_token_mode_needs_a_file(tokens, tmp_path):
    session = tmp_path / "session.yaml"
    write_tokens(session, [("local-admin", "tok-session", ["admin"], [])])
    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens), session_tokens_file=str(session)))
    assert guard.check(PUSH, auth("tok-session")).name == "local-admin"
    assert guard.check(PUSH, auth("tok-admin")).name == "ops"
    with pytest.raises(ValueError, match="auth.mode token needs auth.tokens_file"):
        Guard(AuthConfig(mode="token"))


def test_the_app_and_the_local_stack_refuse_a_config_without_auth():
    from ccoe_common.serving.config import AppConfig, ConfigError
    from ccoe_common.serving.local_stack import LocalStack
    from services.app import build_app

    with pytest.raises(ConfigError, match="no auth section"):
        build_app({"backbone": "/nonexistent"})
    with pytest.raises(ConfigError, match="no auth section"):
        LocalStack(AppConfig.load({"backbone": "/nonexistent"})).start()  # refused before Redis or Ray start


def test_the_audit_identity_is_the_principal_whatever_the_request_claims(tokens):
    from ccoe_common.pb import registry_pb2 as rpb

    guard = Guard(AuthConfig(mode="token", tokens_file=str(tokens)))
    request = rpb.PushExpertRequest(uri="/x", who="root")
    guard.stamp_who(guard.check(PUSH, auth("tok-admin")), request)
    assert request.who == "ops"
    open_guard = Guard(AuthConfig(mode="none"))
    request = rpb.PushExpertRequest(uri="/x", who="root")
    open_guard.stamp_who(open_guard.check(PUSH, {}), request)
    assert request.who == "unauthenticated (root)"
