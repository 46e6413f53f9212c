"""The registry's request checks on a real redis-server, in process (no Ray): refused artifact
sources and export paths, rule tables, and every free-form field. Each refusal has a precise
status, changes nothing in Redis and reads no refused location.

(The same refusals through real gRPC: tests/unit/serving/test_fuzz.py and ccoe bench fuzz.)
"""

from __future__ import annotations

import asyncio
import functools
import re
from pathlib import Path

import pytest
import redis

from ccoe_common.errors import CCoEError
from ccoe_common.experts.artifact import read_artifact
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.registry.artifact_store import ArtifactStore
from ccoe_common.registry.config import RegistryConfig
from ccoe_common.registry.errors import ArtifactRefused, NoReplicaToValidate
from ccoe_common.registry.redis_server import RedisServer
from ccoe_common.registry.service import RegistryService
from ccoe_common.registry.store import RegistryStore
from ccoe_common.routing.rules import REGEX_ENGINE, RuleTable
from tests.unit.registry.test_artifact_store import make_artifact


@pytest.fixture(scope="module")
def server():
    with RedisServer() as s:
        yield s


class Registry:
    """A RegistryService on a fresh Redis database and artifact store; `read` lists every
    location the validator (a replica's load, in the real app) was asked to read."""

    def __init__(self, server: RedisServer, root: Path, **config):
        client = redis.Redis.from_url(server.url, decode_responses=True)
        client.flushdb()
        self.store = RegistryStore(client)
        self.config = RegistryConfig(artifact_store=str(root / "store"), **config)
        self.artifacts = ArtifactStore.from_config(self.config)
        self.read: list[str] = []
        self.refuse: str | None = None  # what the validating replica says, e.g. "wrong backbone"
        self.service = RegistryService(self.store, self.artifacts, self._validate, self.config)

    async def _validate(self, uri: str) -> None:
        self.read.append(uri)
        read_artifact(uri)
        if self.refuse:
            raise ArtifactRefused(f"{uri} does not fit this fleet's backbone: {self.refuse}")

    def call(self, method: str, *args):
        return asyncio.run(getattr(self.service, method)(*args))

    def refused(self, method: str, *args) -> CCoEError:
        before = (self.store.revision(), len(self.store.audit()))
        with pytest.raises(CCoEError) as err:
            self.call(method, *args)
        assert (self.store.revision(), len(self.store.audit())) == before, "a refused request changed Redis"
        return err.value


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    make_artifact(str(tmp_path / "allowed" / "law"), name="law")
    make_artifact(str(tmp_path / "elsewhere" / "law"), name="law")
    (tmp_path / "allowed" / "escape").symlink_to(tmp_path / "elsewhere")
    return tmp_path


@pytest.fixture()
def registry(server, tree) -> Registry:
    return Registry(server, tree, allowed_sources=[str(tree / "allowed")],
                    allowed_export_prefixes=[str(tree / "exports")])


def push(uri: str, **kw) -> pb.PushExpertRequest:
    return pb.PushExpertRequest(uri=uri, who="test", register_only=True, **kw)


def test_a_source_under_an_allowed_prefix_is_pushed(registry, tree):
    response = registry.call("push", push(f"file://{tree}/allowed/x/../law"))
    assert (response.expert.name, response.expert.version) == ("law", 1)
    assert registry.read == [str(tree / "allowed/law")]  # read as normalised


@pytest.mark.parametrize("uri", [
    "http://127.0.0.1:9/artifact", "https://metadata.internal/latest", "gs://bucket/law",
    "{tree}/elsewhere/law", "{tree}/elsewhere/missing", "/proc/self/root/etc", "{tree}/allowed/../elsewhere/law",
    "{tree}/allowed/escape/law", "file://{tree}/elsewhere/law", "simplecache::file://{tree}/allowed/law",
])
def test_a_source_outside_is_refused_before_anything_reads_it(registry, tree, uri):
    error = registry.refused("push", push(uri.format(tree=tree)))
    assert error.code == "INVALID_ARGUMENT" and str(error).startswith("uri: ")
    assert registry.read == [] and registry.artifacts.used_bytes() == 0


def test_the_refusal_does_not_say_whether_an_outside_path_exists(registry, tree):
    there = str(registry.refused("push", push(str(tree / "elsewhere/law"))))
    missing = str(registry.refused("push", push(str(tree / "elsewhere/xyz"))))
    quoted = re.compile(r"^uri: '[^']*'(… \(\d+ characters\))? ")  # the path as given, cut to a prefix
    assert quoted.sub("", there) == quoted.sub("", missing) != there


def test_an_uploaded_artifact_is_pushed_from_the_store(registry, tree):
    stored = registry.artifacts.put(str(tree / "elsewhere/law"), enforce_quota=False)  # what an upload leaves
    assert registry.call("push", push(stored.uri)).stored_uri == stored.uri


def test_an_upload_whose_push_is_refused_leaves_the_store_but_a_registered_version_never_does(registry, tree):
    stored = registry.artifacts.put(str(tree / "elsewhere/law"), enforce_quota=False)  # what an upload leaves
    registry.refuse = "wrong backbone"
    assert "wrong backbone" in str(registry.refused("push", push(stored.uri)))
    assert not Path(stored.uri).exists()
    registry.refuse = None
    stored = registry.artifacts.put(str(tree / "elsewhere/law"), enforce_quota=False)
    registry.call("push", push(stored.uri))
    registry.refuse = "a replica refuses it now"
    registry.refused("push", push(stored.uri))
    assert read_artifact(stored.uri).manifest.name == "law"  # registered: kept


@pytest.mark.parametrize("outcome", ["refused", "unavailable"])
def test_a_push_that_fails_validation_leaves_no_copy_in_the_store(registry, tree, outcome):
    """The store copy runs while a replica validates; whatever the validation's failure, the copy goes."""
    if outcome == "refused":
        registry.refuse = "wrong backbone"
    else:
        async def unavailable(uri: str) -> None:
            read_artifact(uri)
            raise NoReplicaToValidate(f"no model replica answered to validate {uri}")

        registry.service.validate = unavailable
    error = registry.refused("push", push(str(tree / "allowed/law")))
    assert error.code == ("INVALID_ARGUMENT" if outcome == "refused" else "UNAVAILABLE")
    assert registry.artifacts.used_bytes() == 0 and not Path(registry.artifacts.uri_for("law", 1)).exists()


def test_an_upload_whose_validation_is_unavailable_stays_for_a_retry(registry, tree):
    stored = registry.artifacts.put(str(tree / "elsewhere/law"), enforce_quota=False)  # what an upload leaves

    async def unavailable(uri: str) -> None:
        raise NoReplicaToValidate("no model replica answered")

    registry.service.validate = unavailable
    assert registry.refused("push", push(stored.uri)).code == "UNAVAILABLE"
    assert read_artifact(stored.uri).manifest.name == "law"


@pytest.fixture()
def pushed(registry, tree) -> Registry:
    registry.call("push", push(str(tree / "allowed/law")))
    return registry


def pop(export_to: str, **kw) -> pb.PopExpertRequest:
    return pb.PopExpertRequest(name="law", who="test", export_to=export_to, **kw)


def test_an_export_by_name_lands_in_the_stores_exports_folder(pushed, tree):
    response = pushed.call("pop", pop("law-copy"))
    assert response.exported_to == str(tree / "store/_exports/law-copy")
    assert read_artifact(response.exported_to).manifest.name == "law"
    assert pushed.call("pop", pop("", version=1)).retired[0].version == 1  # popping a retired version again is fine


@pytest.mark.parametrize(("export_to", "code", "fragment"), [
    ("/proc/self/fd/1", "INVALID_ARGUMENT", "is not inside an allowed location"),
    ("nosuchproto://x/y", "INVALID_ARGUMENT", "scheme 'nosuchproto' is not allowed"),
    ("s3://bucket/law", "INVALID_ARGUMENT", "scheme 's3' is not allowed"),
    ("{tree}/elsewhere/new", "INVALID_ARGUMENT", "is not inside an allowed location"),
    ("{tree}/store/law/v9", "INVALID_ARGUMENT", "is not inside an allowed location"),
    ("../../etc", "INVALID_ARGUMENT", "leaves the store's _exports folder"),
    ("{tree}/exports/occupied", "ALREADY_EXISTS", "already holds other files"),
    ("{tree}/exports/a-file", "ALREADY_EXISTS", "is a file"),
    ("{tree}/exports/a-file/law", "FAILED_PRECONDITION", "cannot write"),
])
def test_an_export_that_is_refused_retires_nothing(pushed, tree, export_to, code, fragment):
    (tree / "exports" / "occupied").mkdir(parents=True)
    (tree / "exports" / "occupied" / "notes.txt").write_text("mine")
    (tree / "exports" / "a-file").write_text("mine")
    error = pushed.refused("pop", pop(export_to.format(tree=tree)))
    assert (error.code, str(error).split(":")[0]) == (code, "export_to") and fragment in str(error), str(error)
    assert [v.state for v in pushed.store.expert("law").versions] == ["active"]
    assert (tree / "exports" / "occupied" / "notes.txt").read_text() == "mine"


def test_rule_tables_from_clients_are_bounded(pushed):
    accepted = pushed.call("set_rules", pb.SetRulesRequest(
        table="rules: [{id: r, match: {regex: ['^(a+)+$']}, experts: [law]}]", who="t"))
    assert accepted.revision > 0
    (compiled,) = RuleTable.from_dict(pushed.store.rules()[1]).regexes("r")
    assert type(compiled) is REGEX_ENGINE
    for table, fragment in [
        ("rules: [{id: r, match: {regex: ['(?<=x)y']}, experts: [law]}]", "no backreferences"),
        ("[" * 100_000 + "]" * 100_000, "not valid YAML/JSON"),
        ('{"rules": ' + "[" * 20 + "]" * 20 + "}", "nests deeper than 8 levels"),
        ("a: &a [x]\nb: *a", "uses the YAML alias"),
        ("rules: [" + ", ".join(f"{{id: r{i}, match: {{domain: [d]}}, experts: [law]}}" for i in range(300)) + "]",
         "has 300 rules; registry.rule_limits.max_rules is 256"),
        ("x" * (2 << 20), "over registry.max_table_bytes (1048576 bytes of UTF-8)"),
        ("- a list", "expected a mapping"),
    ]:
        error = pushed.refused("set_rules", pb.SetRulesRequest(table=table, who="t"))
        assert error.code == "INVALID_ARGUMENT" and fragment in str(error) and len(str(error)) < 600, str(error)


@pytest.mark.parametrize(("method", "request_", "fragment"), [
    ("push", pb.PushExpertRequest(uri="/x" * 2000), "uri: '/x/x"),
    ("push", pb.PushExpertRequest(uri="/x", who="w" * 2000), "who: 'www"),
    ("pop", pb.PopExpertRequest(name="law", wait_ms=600_001), "wait_ms: 600001 is over registry.max_wait_ms"),
    ("pop", pb.PopExpertRequest(name="../law"), "name: '../law' is not an expert name"),
    ("pop", pb.PopExpertRequest(name="law\n"), "is not an expert name"),
    ("get", "L" * 100_000, "name: 'LLL"),
    ("get_rollout", "", "expert: '' is not an expert name"),
    ("rollback", pb.RollbackRequest(expert="law", reason="r" * 5000), "reason: 'rrr"),
    ("start_rollout", pb.StartRolloutRequest(expert="law", version=1, who="w" * 5000), "who: "),
    ("report", pb.ReplicaState(replica_id="r" * 5000), "replica_id: "),
    ("report", pb.ReplicaState(replica_id="r1", failures=[pb.LoadFailure(name="law", version=1, reason="x" * 5000)]),
     "failures[0].reason: "),
    ("report", pb.ReplicaState(replica_id="r1", loaded=[pb.LoadedVersion(name="law", version=1)] * 5000),
     "over registry.max_report_versions (4096)"),
])
def test_free_form_fields_are_bounded_and_quoted_short(pushed, method, request_, fragment):
    error = pushed.refused(method, request_)
    assert error.code == "INVALID_ARGUMENT" and fragment in str(error) and len(str(error)) < 400, str(error)


def test_audit_pages_are_lowered_to_the_limit(server, tree):
    registry = Registry(server, tree, max_audit_entries=2)
    for name in ("a", "b", "c"):
        make_artifact(str(tree / "store" / "in" / name), name=name)
        registry.call("push", push(str(tree / "store" / "in" / name)))
    assert len(registry.call("audit", 1000).entries) == 2


def test_watchers_are_bounded_too(pushed):
    async def first() -> None:
        async for _ in pushed.service.watch("r" * 5000):
            break

    with pytest.raises(CCoEError, match="replica_id: 'rrr"):
        asyncio.run(first())


def test_a_push_over_the_store_quota_is_resource_exhausted(server, tree):
    registry = Registry(server, tree, allowed_sources=[str(tree / "allowed")], artifact_store_quota_bytes=100)
    error = registry.refused("push", push(str(tree / "allowed/law")))
    assert error.code == "RESOURCE_EXHAUSTED" and "registry.artifact_store_quota_bytes (100 bytes)" in str(error)


def test_config_experts_are_registered_whatever_the_quota_and_allow_list(server, tree):
    registry = Registry(server, tree, artifact_store_quota_bytes=100)
    seed = functools.partial(registry.service.seed, (str(tree / "elsewhere/law"),))
    assert asyncio.run(seed()) == ["law@1"]
