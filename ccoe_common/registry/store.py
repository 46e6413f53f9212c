"""The registry's state in Redis: experts and versions, rules, desired state, audit, heartbeats.

Every change is one Lua script, so it is atomic (all keys or none) and guarded by a revision
(compare-and-set): a writer sends the revision it read; if someone changed the thing since,
nothing is written and it gets `RevisionConflict` carrying the current revision (the gRPC edge
answers ABORTED). Each change also bumps the global revision, appends to the audit stream and
publishes the new revision, so watchers can catch up from a full read and then follow changes.

Key schema (prefix `ccoe:`, all values UTF-8 JSON unless said otherwise):

| key | type | holds |
| --- | --- | --- |
| `ccoe:epoch` | string | the store's identity, written once; a store that lost its data has none |
| `ccoe:rev` | string (int) | global revision, +1 on every change |
| `ccoe:experts` | set | names of registered experts |
| `ccoe:expert:{name}` | hash | `rev` (per-expert CAS revision), `latest` (newest registered version) |
| `ccoe:expert:{name}:v:{version}` | hash | `manifest`, `uri`, `state` (below), `registered_rev` |
| `ccoe:desired` | hash | expert name -> the serving version (what requests resolve to) |
| `ccoe:rollouts` | hash | expert name -> its rollout in progress or its last one (JSON) |
| `ccoe:rules` | hash | `rev`, `table` |
| `ccoe:audit` | stream | one entry per change: `who`, `what`, `detail`, `rev` (entry id = when) |
| `ccoe:replica:{id}` | string, TTL | the replica's last report (loaded versions, health, memory) |
| `ccoe:changes` | pub/sub channel | the new global revision after each change |

A version's `state` is one of `active`, `retired`, `failed`, `rolled_back`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import redis

from ccoe_common.errors import ExpertNotFound
from ccoe_common.registry.errors import RevisionConflict, StaleVersion
from ccoe_common.settings import redis_password

PREFIX = "ccoe:"
CHANNEL = PREFIX + "changes"

# KEYS: rev, experts, expert, version-key, desired, audit, channel, rollouts
# ARGV: name, version, expected_rev, manifest, uri, who, make_desired, rollout ('' = none)
_PUSH = """
local cur = tonumber(redis.call('HGET', KEYS[3], 'rev') or '0')
if cur ~= tonumber(ARGV[3]) then return {'conflict', cur} end
local latest = tonumber(redis.call('HGET', KEYS[3], 'latest') or '0')
local version = tonumber(ARGV[2])
if version <= latest then return {'stale', latest} end
local rev = redis.call('INCR', KEYS[1])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'rev', cur + 1, 'latest', version)
redis.call('HSET', KEYS[4], 'manifest', ARGV[4], 'uri', ARGV[5], 'state', 'active', 'registered_rev', rev)
if ARGV[7] == '1' then redis.call('HSET', KEYS[5], ARGV[1], version) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[8], ARGV[1], ARGV[8]) end
redis.call('XADD', KEYS[6], '*', 'who', ARGV[6], 'what', 'push', 'rev', rev,
           'detail', cjson.encode({expert = ARGV[1], version = version, uri = ARGV[5]}))
redis.call('PUBLISH', KEYS[7], rev)
return {'ok', cur + 1, rev}
"""

# KEYS: rev, expert, desired, audit, channel, rollouts, version-keys...
# ARGV: name, expected_rev, who, versions (json list), rollout ('' = leave as is)
_RETIRE = """
local cur = tonumber(redis.call('HGET', KEYS[2], 'rev') or '0')
if cur ~= tonumber(ARGV[2]) then return {'conflict', cur} end
for i = 7, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'missing', i - 6} end
end
local rev = redis.call('INCR', KEYS[1])
for i = 7, #KEYS do redis.call('HSET', KEYS[i], 'state', 'retired') end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[6], ARGV[1], ARGV[5]) end
local desired = redis.call('HGET', KEYS[3], ARGV[1])
for _, v in ipairs(cjson.decode(ARGV[4])) do
  if desired and tonumber(desired) == v then redis.call('HDEL', KEYS[3], ARGV[1]) end
end
redis.call('HSET', KEYS[2], 'rev', cur + 1)
redis.call('XADD', KEYS[4], '*', 'who', ARGV[3], 'what', 'retire', 'rev', rev,
           'detail', cjson.encode({expert = ARGV[1], versions = cjson.decode(ARGV[4])}))
redis.call('PUBLISH', KEYS[5], rev)
return {'ok', cur + 1, rev}
"""

# One change to an expert that is not a push or a retire: a rollout starting, advancing,
# finishing or rolling back. KEYS: rev, expert, desired, rollouts, audit, channel, version-keys...
# ARGV: name, expected_rev, who, what, detail, rollout ('' = leave), serving ('' = leave,
#       '0' = none, N = version N), new states of the version keys (JSON list, same order)
_UPDATE = """
local cur = tonumber(redis.call('HGET', KEYS[2], 'rev') or '0')
if cur ~= tonumber(ARGV[2]) then return {'conflict', cur} end
local rev = redis.call('INCR', KEYS[1])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[4], ARGV[1], ARGV[6]) end
if ARGV[7] == '0' then redis.call('HDEL', KEYS[3], ARGV[1])
elseif ARGV[7] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[7]) end
local states = cjson.decode(ARGV[8])
for i = 7, #KEYS do redis.call('HSET', KEYS[i], 'state', states[i - 6]) end
redis.call('HSET', KEYS[2], 'rev', cur + 1)
redis.call('XADD', KEYS[5], '*', 'who', ARGV[3], 'what', ARGV[4], 'rev', rev, 'detail', ARGV[5])
redis.call('PUBLISH', KEYS[6], rev)
return {'ok', cur + 1, rev}
"""

# KEYS: rev, rules, audit, channel   ARGV: expected_rev, table, who
_SET_RULES = """
local cur = tonumber(redis.call('HGET', KEYS[2], 'rev') or '0')
if cur ~= tonumber(ARGV[1]) then return {'conflict', cur} end
local rev = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], 'rev', cur + 1, 'table', ARGV[2])
redis.call('XADD', KEYS[3], '*', 'who', ARGV[3], 'what', 'set_rules', 'rev', rev,
           'detail', cjson.encode({rules_rev = cur + 1}))
redis.call('PUBLISH', KEYS[4], rev)
return {'ok', cur + 1, rev}
"""


# Gives a store its epoch unless it has one, audited. KEYS: epoch, rev, audit, channel, experts
# ARGV: new epoch, who. Returns {1, epoch} if it wrote it, {0, the existing epoch} if not.
_INIT_EPOCH = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
redis.call('SET', KEYS[1], ARGV[1])
local rev = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'who', ARGV[2], 'what', 'store_initialized', 'rev', rev,
           'detail', cjson.encode({epoch = ARGV[1], experts = redis.call('SCARD', KEYS[5])}))
redis.call('PUBLISH', KEYS[4], rev)
return {1, ARGV[1]}
"""


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: int
    uri: str
    state: str  # "active" | "retired"
    manifest: dict[str, Any]
    registered_rev: int


@dataclass(frozen=True)
class ExpertRecord:
    name: str
    rev: int
    latest: int
    desired: int | None
    versions: list[VersionRecord]


@dataclass(frozen=True)
class DesiredState:
    """What every replica should serve, as of global revision `rev`."""

    rev: int
    experts: dict[str, int]  # name -> serving version
    rules_rev: int
    rules: dict[str, Any] | None = None
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> rollout record
    epoch: str = ""  # the store's identity ("" = none: an empty store, see fail_static.py)


@dataclass(frozen=True)
class AuditEntry:
    id: str  # Redis stream id: "<ms since epoch>-<seq>"
    who: str
    what: str
    rev: int
    detail: dict[str, Any]

    @property
    def at_ms(self) -> int:
        return int(self.id.split("-")[0])


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client of the registry's Redis, e.g. redis_client("redis://ccoe-redis:6379/0").

    A URL without a password takes CCOE_REDIS_PASSWORD: on Kubernetes the password reaches the
    pods from a Secret as that variable, so it stays out of the app config, which the RayService,
    the ConfigMap and Ray's dashboard all show. A password in the URL wins (the local stack's).
    """
    password = redis_password()
    if password and not urlsplit(url).password:
        options.setdefault("password", password)
    return redis.Redis.from_url(url, decode_responses=True, **options)


# redis_client decodes every reply (decode_responses=True), so hash fields, set members and
# stream entries are str; redis-py types them `bytes | str` since decoding is a client option.
_Hash = dict[str, str]
_Stream = list[tuple[str, _Hash]]


class RegistryStore:
    def __init__(self, client: redis.Redis):
        self.r = client
        self._push = client.register_script(_PUSH)
        self._retire = client.register_script(_RETIRE)
        self._set_rules = client.register_script(_SET_RULES)
        self._update = client.register_script(_UPDATE)
        self._init_epoch = client.register_script(_INIT_EPOCH)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RegistryStore:
        return cls(redis_client(url, **options))

    # ---- keys ----------------------------------------------------------------------------

    @staticmethod
    def _expert(name: str) -> str:
        return f"{PREFIX}expert:{name}"

    @staticmethod
    def _version(name: str, version: int) -> str:
        return f"{PREFIX}expert:{name}:v:{version}"

    # ---- writes (atomic, compare-and-set) ------------------------------------------------

    def push_version(self, name: str, version: int, manifest: dict[str, Any], uri: str, *,
                     expected_rev: int, who: str, make_desired: bool = True,
                     rollout: dict[str, Any] | None = None) -> int:
        """Register `name@version` and either make it the serving version at once
        (make_desired) or record `rollout` to bring it in. Returns the expert's new revision.
        Raises RevisionConflict or StaleVersion; writes nothing then."""
        result = self._push(
            keys=[PREFIX + "rev", PREFIX + "experts", self._expert(name), self._version(name, version),
                  PREFIX + "desired", PREFIX + "audit", CHANNEL, PREFIX + "rollouts"],
            args=[name, version, expected_rev, json.dumps(manifest, sort_keys=True), uri, who,
                  "1" if make_desired else "0", "" if rollout is None else json.dumps(rollout, sort_keys=True)],
        )
        return self._outcome(result, f"expert {name!r}", expected_rev, version)

    def retire(self, name: str, versions: list[int], *, expected_rev: int, who: str,
               rollout: dict[str, Any] | None = None) -> int:
        """Mark versions retired and drop them from the desired state, in one step (and, if
        given, record `rollout`: the one that was bringing a retired version in, now ended)."""
        if not versions:
            raise ValueError("name at least one version to retire")
        result = self._retire(
            keys=[PREFIX + "rev", self._expert(name), PREFIX + "desired", PREFIX + "audit", CHANNEL,
                  PREFIX + "rollouts", *[self._version(name, v) for v in versions]],
            args=[name, expected_rev, who, json.dumps(versions),
                  "" if rollout is None else json.dumps(rollout, sort_keys=True)],
        )
        if result[0] == "missing":
            raise ExpertNotFound(f"expert {name!r} has no version {versions[int(result[1]) - 1]}")
        return self._outcome(result, f"expert {name!r}", expected_rev)

    def update_expert(self, name: str, *, expected_rev: int, who: str, what: str, detail: dict[str, Any],
                      rollout: dict[str, Any] | None = None, serving: int | None = None,
                      version_states: dict[int, str] | None = None) -> int:
        """One atomic, revision-guarded change to an expert's rollout, serving version
        (`serving=0` = none) and version states, audited as `what`."""
        states = sorted((version_states or {}).items())
        result = self._update(
            keys=[PREFIX + "rev", self._expert(name), PREFIX + "desired", PREFIX + "rollouts", PREFIX + "audit",
                  CHANNEL, *[self._version(name, v) for v, _ in states]],
            args=[name, expected_rev, who, what, json.dumps({"expert": name, **detail}, sort_keys=True),
                  "" if rollout is None else json.dumps(rollout, sort_keys=True),
                  "" if serving is None else str(serving), json.dumps([st for _, st in states])],
        )
        return self._outcome(result, f"expert {name!r}", expected_rev)

    def set_rules(self, table: dict[str, Any], *, expected_rev: int, who: str) -> int:
        result = self._set_rules(keys=[PREFIX + "rev", PREFIX + "rules", PREFIX + "audit", CHANNEL],
                                 args=[expected_rev, json.dumps(table, sort_keys=True), who])
        return self._outcome(result, "the rule table", expected_rev)

    def init_epoch(self, epoch: str, who: str) -> tuple[bool, str]:
        """Give the store the epoch `epoch` unless it has one: (True, epoch) if written, else
        (False, the existing one). Atomic, so of two registries racing only one writes."""
        written, current = self._init_epoch(keys=[PREFIX + "epoch", PREFIX + "rev", PREFIX + "audit", CHANNEL,
                                                  PREFIX + "experts"], args=[epoch, who])
        return bool(int(written)), str(current)

    @staticmethod
    def _outcome(result: list, what: str, expected_rev: int, version: int | None = None) -> int:
        status = result[0]
        if status == "conflict":
            raise RevisionConflict(what, expected_rev, int(result[1]))
        if status == "stale":
            raise StaleVersion(f"{what}: version {version} is not newer than the registered {int(result[1])}; "
                               f"push version {int(result[1]) + 1} or higher")
        return int(result[1])

    # ---- reads ---------------------------------------------------------------------------

    def expert(self, name: str) -> ExpertRecord:
        head = self.r.hgetall(self._expert(name))
        if not head:
            raise ExpertNotFound(f"no expert named {name!r} is registered")
        latest = int(head["latest"])
        pipe = self.r.pipeline(transaction=True)
        for v in range(1, latest + 1):
            pipe.hgetall(self._version(name, v))
        pipe.hget(PREFIX + "desired", name)
        *rows, desired = pipe.execute()
        versions = [VersionRecord(name, v, row["uri"], row["state"], json.loads(row["manifest"]),
                                  int(row["registered_rev"])) for v, row in enumerate(rows, 1) if row]
        return ExpertRecord(name, int(head["rev"]), latest, None if desired is None else int(desired), versions)

    def version(self, name: str, version: int) -> VersionRecord:
        row = cast(_Hash, self.r.hgetall(self._version(name, version)))
        if not row:
            raise ExpertNotFound(f"expert {name!r} has no version {version}")
        return VersionRecord(name, version, row["uri"], row["state"], json.loads(row["manifest"]),
                             int(row["registered_rev"]))

    def rollout(self, name: str) -> dict[str, Any] | None:
        raw = self.r.hget(PREFIX + "rollouts", name)
        return None if raw is None else json.loads(raw)

    def revision(self) -> int:
        """The global revision: +1 on every change, so a watcher polls it to see that something changed."""
        return int(self.r.get(PREFIX + "rev") or 0)

    def head(self) -> tuple[str, int]:
        """(epoch, global revision) in one round trip; what the registry polls. ("", 0) = an empty store."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(PREFIX + "epoch")
        pipe.get(PREFIX + "rev")
        epoch, rev = pipe.execute()
        return epoch or "", int(rev or 0)

    def expert_rev(self, name: str) -> int:
        return int(self.r.hget(self._expert(name), "rev") or 0)

    def names(self) -> list[str]:
        return sorted(cast("set[str]", self.r.smembers(PREFIX + "experts")))

    def desired_state(self) -> DesiredState:
        """A consistent snapshot (one MULTI/EXEC): the full state a (re)connecting replica needs."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(PREFIX + "rev")
        pipe.hgetall(PREFIX + "desired")
        pipe.hmget(PREFIX + "rules", "rev", "table")
        pipe.hgetall(PREFIX + "rollouts")
        pipe.get(PREFIX + "epoch")
        rev, desired, (rules_rev, table), rollouts, epoch = pipe.execute()
        return DesiredState(int(rev or 0), {k: int(v) for k, v in desired.items()}, int(rules_rev or 0),
                            None if table is None else json.loads(table),
                            {k: json.loads(v) for k, v in rollouts.items()}, epoch or "")

    def uris(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """Artifact URIs of registered versions (immutable once registered, so no snapshot needed)."""
        pipe = self.r.pipeline(transaction=False)
        for name, version in keys:
            pipe.hget(self._version(name, version), "uri")
        return {k: u for k, u in zip(keys, pipe.execute(), strict=True) if u is not None}

    def rules(self) -> tuple[int, dict[str, Any] | None]:
        rev, table = self.r.hmget(PREFIX + "rules", "rev", "table")
        return int(rev or 0), None if table is None else json.loads(table)

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        """Newest first."""
        entries = cast(_Stream, self.r.xrevrange(PREFIX + "audit", count=limit))
        return [AuditEntry(id_, f["who"], f["what"], int(f["rev"]), json.loads(f["detail"])) for id_, f in entries]

    # ---- replicas ------------------------------------------------------------------------

    def heartbeat(self, replica_id: str, report: dict[str, Any], ttl_s: float) -> None:
        """A replica's report; it disappears unless renewed within ttl_s."""
        self.r.set(f"{PREFIX}replica:{replica_id}", json.dumps(report, sort_keys=True), px=int(ttl_s * 1000))

    def replicas(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key in self.r.scan_iter(match=f"{PREFIX}replica:*", count=500):
            value = self.r.get(key)
            if value is not None:  # expired between SCAN and GET
                out[key.removeprefix(f"{PREFIX}replica:")] = json.loads(value)
        return out
