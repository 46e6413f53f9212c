"""The registry's state in Redis: experts and versions, rules, desired state, audit, heartbeats.

Every change is one Lua script, so it is atomic (all keys or none) and guarded by a revision
(compare-and-set): a writer sends the revision it read; if someone changed the thing since,
nothing is written and it gets `RevisionConflict` carrying the current revision (the gRPC edge
answers ABORTED). Each change also bumps the global revision, appends to the audit stream and
publishes the new revision, so watchers can catch up from a full read and then follow changes.

Key schema (prefix `ccoe:`, all values UTF-8 JSON unless said otherwise):

| key | type | holds |
| --- | --- | --- |
| `ccoe:rev` | string (int) | global revision, +1 on every change |
| `ccoe:experts` | set | names of registered experts |
| `ccoe:expert:{name}` | hash | `rev` (per-expert CAS revision), `latest` (newest registered version) |
| `ccoe:expert:{name}:v:{version}` | hash | `manifest`, `uri`, `state` (`active` or `retired`), `registered_rev` |
| `ccoe:desired` | hash | expert name -> version every replica should serve |
| `ccoe:rules` | hash | `rev`, `table` |
| `ccoe:audit` | stream | one entry per change: `who`, `what`, `detail`, `rev` (entry id = when) |
| `ccoe:replica:{id}` | string, TTL | the replica's last report (loaded versions, health, memory) |
| `ccoe:changes` | pub/sub channel | the new global revision after each change |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

PREFIX = "ccoe:"
CHANNEL = PREFIX + "changes"

# KEYS: rev, experts, expert, version-key, desired, audit
# ARGV: name, version, expected_rev, manifest, uri, who, make_desired
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
redis.call('XADD', KEYS[6], '*', 'who', ARGV[6], 'what', 'push', 'rev', rev,
           'detail', cjson.encode({expert = ARGV[1], version = version, uri = ARGV[5]}))
redis.call('PUBLISH', KEYS[7], rev)
return {'ok', cur + 1, rev}
"""

# KEYS: rev, expert, desired, audit, channel, version-keys...
# ARGV: name, expected_rev, who, versions (json list)
_RETIRE = """
local cur = tonumber(redis.call('HGET', KEYS[2], 'rev') or '0')
if cur ~= tonumber(ARGV[2]) then return {'conflict', cur} end
for i = 6, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'missing', i - 5} end
end
local rev = redis.call('INCR', KEYS[1])
for i = 6, #KEYS do redis.call('HSET', KEYS[i], 'state', 'retired') end
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


class RegistryError(Exception):
    code = "INTERNAL"


class RevisionConflict(RegistryError):
    """Someone changed it since you read it. `current` is the revision to re-read and retry from."""

    code = "ABORTED"

    def __init__(self, what: str, expected: int, current: int):
        self.what, self.expected, self.current = what, expected, current
        super().__init__(f"{what} changed concurrently: you sent revision {expected}, current is {current}; "
                         "re-read and retry")

    def __reduce__(self):
        return RevisionConflict, (self.what, self.expected, self.current)


class StaleVersion(RegistryError):
    code = "FAILED_PRECONDITION"


class UnknownExpert(RegistryError):
    code = "NOT_FOUND"


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
    experts: dict[str, int]
    rules_rev: int


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


class RegistryStore:
    def __init__(self, client: redis.Redis):
        self.r = client
        self._push = client.register_script(_PUSH)
        self._retire = client.register_script(_RETIRE)
        self._set_rules = client.register_script(_SET_RULES)

    @classmethod
    def from_url(cls, url: str) -> RegistryStore:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # ---- keys ----------------------------------------------------------------------------

    @staticmethod
    def _expert(name: str) -> str:
        return f"{PREFIX}expert:{name}"

    @staticmethod
    def _version(name: str, version: int) -> str:
        return f"{PREFIX}expert:{name}:v:{version}"

    # ---- writes (atomic, compare-and-set) ------------------------------------------------

    def push_version(self, name: str, version: int, manifest: dict[str, Any], uri: str, *,
                     expected_rev: int, who: str, make_desired: bool = True) -> int:
        """Register `name@version` (and by default make it the desired version). Returns the
        expert's new revision. Raises RevisionConflict or StaleVersion; writes nothing then."""
        result = self._push(
            keys=[PREFIX + "rev", PREFIX + "experts", self._expert(name), self._version(name, version),
                  PREFIX + "desired", PREFIX + "audit", CHANNEL],
            args=[name, version, expected_rev, json.dumps(manifest, sort_keys=True), uri, who,
                  "1" if make_desired else "0"],
        )
        return self._outcome(result, f"expert {name!r}", expected_rev, version)

    def retire(self, name: str, versions: list[int], *, expected_rev: int, who: str) -> int:
        """Mark versions retired and drop them from the desired state, in one step."""
        if not versions:
            raise ValueError("name at least one version to retire")
        result = self._retire(
            keys=[PREFIX + "rev", self._expert(name), PREFIX + "desired", PREFIX + "audit", CHANNEL,
                  *[self._version(name, v) for v in versions]],
            args=[name, expected_rev, who, json.dumps(versions)],
        )
        if result[0] == "missing":
            raise UnknownExpert(f"expert {name!r} has no version {versions[int(result[1]) - 1]}")
        return self._outcome(result, f"expert {name!r}", expected_rev)

    def set_rules(self, table: dict[str, Any], *, expected_rev: int, who: str) -> int:
        result = self._set_rules(keys=[PREFIX + "rev", PREFIX + "rules", PREFIX + "audit", CHANNEL],
                                 args=[expected_rev, json.dumps(table, sort_keys=True), who])
        return self._outcome(result, "the rule table", expected_rev)

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
            raise UnknownExpert(f"no expert named {name!r} is registered")
        latest = int(head["latest"])
        pipe = self.r.pipeline(transaction=True)
        for v in range(1, latest + 1):
            pipe.hgetall(self._version(name, v))
        pipe.hget(PREFIX + "desired", name)
        *rows, desired = pipe.execute()
        versions = [VersionRecord(name, v, row["uri"], row["state"], json.loads(row["manifest"]),
                                  int(row["registered_rev"])) for v, row in enumerate(rows, 1) if row]
        return ExpertRecord(name, int(head["rev"]), latest, None if desired is None else int(desired), versions)

    def expert_rev(self, name: str) -> int:
        return int(self.r.hget(self._expert(name), "rev") or 0)

    def names(self) -> list[str]:
        return sorted(self.r.smembers(PREFIX + "experts"))

    def desired_state(self) -> DesiredState:
        """A consistent snapshot (one MULTI/EXEC): the full state a (re)connecting replica needs."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(PREFIX + "rev")
        pipe.hgetall(PREFIX + "desired")
        pipe.hget(PREFIX + "rules", "rev")
        rev, desired, rules_rev = pipe.execute()
        return DesiredState(int(rev or 0), {k: int(v) for k, v in desired.items()}, int(rules_rev or 0))

    def rules(self) -> tuple[int, dict[str, Any] | None]:
        rev, table = self.r.hmget(PREFIX + "rules", "rev", "table")
        return int(rev or 0), None if table is None else json.loads(table)

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        """Newest first."""
        return [AuditEntry(id_, f["who"], f["what"], int(f["rev"]), json.loads(f["detail"]))
                for id_, f in self.r.xrevrange(PREFIX + "audit", count=limit)]

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
