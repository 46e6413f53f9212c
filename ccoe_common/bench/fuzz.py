"""`ccoe bench fuzz`: random requests to every gRPC method of a running stack; the status histogram.

Every request message of `ccoe.v1.Inference` and `ccoe.v1.Registry` is generated from its
descriptor, field by field: random text, and values chosen to hurt (megabyte strings, paths
outside the store, `http://` sources, YAML that nests deeply or aliases itself, unknown enum
numbers, infinities, maps of hundreds of keys); plus raw bytes that may not decode at all. The
service promise (invariant 6): no answer is INTERNAL or UNKNOWN, no call hangs, and the stack
still serves a plain request afterwards.

    ccoe bench fuzz --cases 2000         # a local stack (tiny model), 2000 requests, a table per method
    ccoe bench fuzz --cases 500 --json   # one JSON object: histogram, the bad answers, still serving

The same generator drives the property-based test (tests/unit/serving/test_fuzz.py), where
`hypothesis` supplies the choices (`Draw`) and shrinks a failure to a small request.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from ccoe_common.auth.client import authorized_channel
from ccoe_common.console import add_json_flag, format_table, print_json, stdout_to_stderr
from ccoe_common.pb import inference_pb2, registry_pb2

T = TypeVar("T")
SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["Inference"],
            registry_pb2.DESCRIPTOR.services_by_name["Registry"])
METHODS: tuple[MethodDescriptor, ...] = tuple(m for s in SERVICES for m in s.methods)
BAD = ("INTERNAL", "UNKNOWN")
HANG = "HANG"  # the client's own deadline passed: the server neither answered nor gave up
CALL_TIMEOUT_S = 120.0

# With positive values so small that dividing logits by them overflows (1e-45...): sampling
# with them once crashed an engine step for every row in it (#15 item 2).
_FLOATS = (0.0, 0.5, 1.0, 2.0, 10.0, 11.0, -1.0, math.inf, -math.inf, math.nan, 1e300, 1e-45, 1e-38, 5e-324)
_GENERIC_TEXT = ("", "a", "math", "0", " ", "\x00", "é" * 40, "日本語", "x" * 70, "__ccoe_decode_error__",
                 "../../etc/passwd", "%s%n", "${jndi:x}", "\u202e", "[" * 2000, "a: &a [x, x]\nb: *a")
_HINTS: dict[str, tuple[str, ...]] = {
    "uri": ("http://127.0.0.1:1/artifact", "https://169.254.169.254/latest", "file:///etc/passwd",
            "/proc/self/environ", "file://etc/passwd", "gs://bucket/x", "simplecache::file:///x", "relative/dir",
            "~/x", "/"),
    "export_to": ("law-copy", "../../etc", "/proc/self/fd/1", "nosuchproto://x/y", "file:///tmp", "/", "a/../../b"),
    "table": ("rules: []", "version: 2\nrules: [{id: r, match: {regex: ['^(a+)+$']}, experts: [math]}]",
              "rules: [{id: r, match: {regex: ['(?<=a)b']}, experts: [math]}]", "[" * 5000 + "]" * 5000,
              '{"rules": ' + "[" * 40 + "]" * 40 + "}", "a: &a [x]\nb: [*a, *a]", "rules: [{id: r}]",
              "rules: [{id: r, match: {domain: [x]}, experts: [ghost]}]", "- 1\n- 2", "{{{", "d: 2001-12-14"),
    "name": ("math", "sql", "law", "ghost", "../x", "Math", "math\n", "m" * 64),
    "expert": ("math", "sql", "law", "ghost", "../x"),
    "file": ("manifest.json", "weights.safetensors", "../manifest.json", "x"),
    "role": ("user", "system", "assistant", "tool", "r" * 1000),
    "domain": ("math", "sql", "law"),
    "prompt": ("Compute 2 + 2", "SELECT a FROM t", "a" * 27 + "b"),
    "content": ("Compute 2 + 2", "hi"),
}


class Draw(Protocol):
    """Where the choices come from: a seeded random.Random (the bench) or hypothesis (the test)."""

    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def text(self, max_len: int) -> str: ...

    def blob(self, max_len: int) -> bytes: ...


class RandomDraw:
    def __init__(self, seed: int):
        self.random = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.random.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.random.randrange(len(options))]

    def text(self, max_len: int) -> str:
        n = self.random.randint(0, max_len)
        # Mostly ASCII, some of everything else a protobuf string may hold (no surrogates).
        return "".join(chr(self.random.randint(32, 126)) if self.random.random() < 0.8 else
                       chr(self.random.choice((self.random.randint(0, 0xD7FF), self.random.randint(0xE000, 0x10FFFF))))
                       for _ in range(n))

    def blob(self, max_len: int) -> bytes:
        return self.random.randbytes(self.random.randint(0, max_len))


@dataclass(frozen=True)
class Options:
    """What the generator may use. `hints` adds values per field name, e.g. the URI of a real
    artifact the stack may load."""

    hints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    max_depth: int = 3


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _string(name: str, draw: Draw, options: Options) -> str:
    kind = draw.integer(0, 4)
    if kind == 0:
        return draw.text(24)
    if kind == 1:
        return draw.choice(_GENERIC_TEXT)
    if kind == 2:
        hints = (*_HINTS.get(name, ()), *options.hints.get(name, ()))
        return draw.choice(hints) if hints else draw.text(8)
    if kind == 3:
        return draw.choice(("x", "é", "[")) * draw.choice((200, 5_000, 300_000))
    return draw.text(4)


def _scalar(f: FieldDescriptor, draw: Draw, options: Options) -> Any:
    if f.type == FieldDescriptor.TYPE_STRING:
        return _string(f.name, draw, options)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return draw.blob(draw.choice((16, 4096)))
    if f.type == FieldDescriptor.TYPE_BOOL:
        return bool(draw.integer(0, 1))
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return draw.choice(_FLOATS)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return draw.choice([v.number for v in f.enum_type.values] + [99, -1])
    lo, hi = _INT_RANGES[f.type]
    return min(hi, max(lo, draw.choice((0, 1, 2, 3, 7, 100, -1, lo, hi, draw.integer(lo, hi)))))


def _set_field(msg: Message, f: FieldDescriptor, draw: Draw, options: Options, depth: int) -> None:
    sub = f.message_type
    if sub is not None and sub.GetOptions().map_entry:
        target = getattr(msg, f.name)
        value_field = sub.fields_by_name["value"]
        for _ in range(draw.choice((1, 2, 3, 500))):
            if value_field.message_type is None:
                target[_string("key", draw, options)] = _scalar(value_field, draw, options)
    elif f.is_repeated:
        target = getattr(msg, f.name)
        if sub is not None:
            for _ in range(draw.choice((1, 2, 3, 50))):
                target.add().CopyFrom(generate(sub, draw, options, depth + 1))
        else:
            target.extend(_scalar(f, draw, options) for _ in range(draw.choice((1, 2, 20))))
    elif sub is not None:
        getattr(msg, f.name).CopyFrom(generate(sub, draw, options, depth + 1))
    else:
        setattr(msg, f.name, _scalar(f, draw, options))


def generate(descriptor: Descriptor, draw: Draw, options: Options = Options(), depth: int = 0) -> Message:
    """A message of `descriptor`'s type with a random subset of its fields set."""
    msg = message_factory.GetMessageClass(descriptor)()
    if depth >= options.max_depth:
        return msg
    for f in descriptor.fields:
        if draw.integer(0, 2) > 0:  # else left unset (proto3's default)
            _set_field(msg, f, draw, options, depth)
    return msg


def _valid(descriptor: Descriptor, options: Options) -> list[Message]:
    """Requests that succeed, to start from: a fully random request is nearly always refused by
    its first check, so the paths behind the checks (routing, the engine, rollouts) need these."""
    i, r = inference_pb2, registry_pb2
    uri = (options.hints.get("uri") or ("/nowhere",))[0]
    bases: dict[str, list[Message]] = {
        "ccoe.v1.GenerateRequest": [
            i.GenerateRequest(prompt="Compute 2 + 2", max_tokens=4),
            i.GenerateRequest(prompt="Compute 2 + 2", domain="math", max_tokens=3,
                              sampling=i.SamplingParams(temperature=0.7, top_p=0.9, seed=1)),
            i.GenerateRequest(messages=i.ChatMessages(messages=[i.ChatMessage(role="user", content="hi")]),
                              template=i.CHAT, expert=i.ExpertRef(name="math"), max_tokens=3)],
        "ccoe.v1.PushExpertRequest": [r.PushExpertRequest(uri=uri, who="fuzz", register_only=True)],
        "ccoe.v1.ArtifactChunk": [r.ArtifactChunk(expert="law", version=9, file="manifest.json", data=b"{}")],
        "ccoe.v1.PopExpertRequest": [r.PopExpertRequest(name="law", who="fuzz")],
        "ccoe.v1.GetExpertRequest": [r.GetExpertRequest(name="math")],
        "ccoe.v1.SetRulesRequest": [r.SetRulesRequest(table="rules: [{id: m, match: {domain: [math]}, "
                                                            "experts: [math]}]", who="fuzz")],
        "ccoe.v1.StartRolloutRequest": [r.StartRolloutRequest(expert="math", version=1, who="fuzz")],
        "ccoe.v1.GetRolloutRequest": [r.GetRolloutRequest(expert="math")],
        "ccoe.v1.RollbackRequest": [r.RollbackRequest(expert="math", reason="fuzz", who="fuzz")],
        "ccoe.v1.ReplicaState": [r.ReplicaState(replica_id="fuzz-replica", healthy=True,
                                                loaded=[r.LoadedVersion(name="math", version=1)])],
        "ccoe.v1.ListAuditRequest": [r.ListAuditRequest(limit=5)],
        "ccoe.v1.WatchDesiredStateRequest": [r.WatchDesiredStateRequest(replica_id="fuzz-replica")],
    }
    return bases.get(descriptor.full_name, [message_factory.GetMessageClass(descriptor)()])


def mutate(descriptor: Descriptor, draw: Draw, options: Options = Options()) -> Message:
    """A valid request with zero to two fields replaced by generated values."""
    msg = message_factory.GetMessageClass(descriptor)()
    msg.CopyFrom(draw.choice(_valid(descriptor, options)))
    for _ in range(draw.integer(0, 2)):
        _replace_one(msg, draw, options)
    return msg


def _replace_one(msg: Message, draw: Draw, options: Options) -> None:
    """One field replaced; inside a nested message (sampling, say) often one field of it, so
    that a single bad value reaches the code behind the checks the other fields pass."""
    fields = msg.DESCRIPTOR.fields
    if not fields:
        return
    f = draw.choice(fields)
    nested = f.message_type is not None and not f.is_repeated
    if nested and draw.integer(0, 1):
        _replace_one(getattr(msg, f.name), draw, options)
        return
    msg.ClearField(f.name)
    _set_field(msg, f, draw, options, 1)


def raw_bytes(descriptor: Descriptor, draw: Draw, options: Options = Options()) -> bytes:
    """Bytes for a request of this type that may not decode: random, or a real message cut
    short, with a byte changed, or with a string field of bad UTF-8 appended."""
    body = generate(descriptor, draw, options).SerializeToString()
    kind = draw.integer(0, 3)
    if kind == 0:
        return draw.blob(64)
    if kind == 1 and body:
        return body[:draw.integer(0, len(body) - 1)]
    if kind == 2 and body:
        i = draw.integer(0, len(body) - 1)
        return body[:i] + bytes([draw.integer(0, 255)]) + body[i + 1:]
    number = draw.choice([f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING] or [1])
    return body + bytes([number << 3 | 2, 3, 0xFF, 0xFE, 0x41])


@dataclass(frozen=True)
class Case:
    """One call: the method and what is sent (a request's bytes, or a client stream's chunks)."""

    method: MethodDescriptor
    payload: tuple[bytes, ...]
    raw: bool  # bytes that may not decode

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


def make_case(method: MethodDescriptor, draw: Draw, options: Options = Options()) -> Case:
    """A quarter raw bytes, a quarter random messages, half valid requests with a field or two changed."""
    kind = draw.integer(0, 3)
    count = draw.integer(0, 4) if method.client_streaming else 1

    def one() -> bytes:
        if kind == 0:
            return raw_bytes(method.input_type, draw, options)
        if kind == 1:
            return generate(method.input_type, draw, options).SerializeToString()
        return mutate(method.input_type, draw, options).SerializeToString()

    return Case(method, tuple(one() for _ in range(count)), raw=kind == 0)


@dataclass(frozen=True)
class Outcome:
    code: str  # a grpc.StatusCode name, or HANG
    details: str


def call(channel: grpc.Channel, case: Case, timeout_s: float = CALL_TIMEOUT_S,
         metadata: Sequence[tuple[str, str]] = ()) -> Outcome:
    """Send one case; a server stream is read to its end, except WatchDesiredState, which never
    ends (its first message is the answer)."""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if case.method.client_streaming:
            channel.stream_unary(case.path, **identity)(iter(case.payload), timeout=timeout_s, metadata=metadata)
        elif case.method.server_streaming:
            stream = channel.unary_stream(case.path, **identity)(case.payload[0], timeout=timeout_s,
                                                                  metadata=metadata)
            for _ in stream:
                if case.method.name == "WatchDesiredState":
                    stream.cancel()
                    break
        else:
            channel.unary_unary(case.path, **identity)(case.payload[0], timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.CANCELLED and case.method.name == "WatchDesiredState":
            return Outcome("OK", "")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
            return Outcome(HANG, f"no answer within {timeout_s:g} s")
        return Outcome(code.name, details)
    return Outcome("OK", "")


@dataclass
class Report:
    histogram: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    bad: list[dict[str, Any]] = field(default_factory=list)  # INTERNAL, UNKNOWN and hangs, with what was sent

    def add(self, case: Case, outcome: Outcome) -> None:
        self.histogram[case.method.name][outcome.code] += 1
        if outcome.code in (*BAD, HANG):
            self.bad.append({"method": case.method.name, "code": outcome.code, "details": outcome.details[:300],
                             "raw": case.raw, "request": _describe(case)})

    def totals(self) -> Counter:
        total: Counter = Counter()
        for counts in self.histogram.values():
            total.update(counts)
        return total


def _describe(case: Case) -> str:
    if case.raw:
        return " ".join(p[:48].hex() for p in case.payload)
    cls = message_factory.GetMessageClass(case.method.input_type)
    text = " | ".join(str(cls.FromString(p)).replace("\n", " ") for p in case.payload)
    return text if len(text) <= 300 else text[:300] + "…"


# ---- the bench: a local stack ------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=1000, help="requests to send (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    parser.add_argument("--timeout-s", type=float, default=CALL_TIMEOUT_S,
                        help=f"a call with no answer after this long counts as a hang (default {CALL_TIMEOUT_S:g})")
    add_json_flag(parser)


def _still_serving(channel: grpc.Channel) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ccoe_common.pb import inference_pb2_grpc

    try:
        reply = inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(prompt="Compute 1 + 1", max_tokens=2), timeout=120)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    except grpc.RpcError:
        return False
    return reply.usage.completion_tokens > 0 and health.status == health_pb2.HealthCheckResponse.SERVING


def fuzz(address: str, cases: int, seed: int, options: Options, timeout_s: float = CALL_TIMEOUT_S,
         progress: Any = None, token: str | None = None) -> tuple[Report, bool]:
    """`token` is sent with every call: one holding every role reaches the validation behind the
    guard, which is what a fuzzer wants to exercise."""
    draw = RandomDraw(seed)
    report = Report()
    with authorized_channel(address, token) as channel:
        for i in range(cases):
            case = make_case(draw.choice(METHODS), draw, options)
            report.add(case, call(channel, case, timeout_s))
            if progress is not None:
                progress(i + 1, cases)
        return report, _still_serving(channel)


def run(args: argparse.Namespace) -> int:
    from ccoe_common.auth.config import AuthConfig
    from ccoe_common.auth.tokens import TokenEntry, mint_token, token_hash
    from ccoe_common.model.demo_assets import demo_backbone, demo_experts
    from ccoe_common.ports import free_port
    from ccoe_common.serving.config import AppConfig
    from ccoe_common.serving.local_stack import LocalStack

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ccoe-fuzz-") as tmp, stdout_to_stderr(args.json):
        work = Path(tmp)
        uris = demo_experts(work)
        config = AppConfig.load({
            "backbone": str(demo_backbone(work)), "experts": [uris["math"], uris["sql"]],
            "rules_inline": {"rules": [{"id": "m", "match": {"domain": ["math"]}, "experts": ["math"]}]},
            "replica": {"engine": {"max_seq_len": 128, "max_running": 4, "max_waiting": 16}},
            "registry": {"allowed_sources": [str(work / "experts")]},
        })
        token = mint_token()
        tokens = work / "tokens.yaml"
        tokens.write_text(TokenEntry(name="fuzzer", sha256=token_hash(token),
                                     roles=("inference", "admin", "replica")).line() + "\n")
        config = config.model_copy(update={"auth": AuthConfig(mode="token", tokens_file=str(tokens))})
        options = Options(hints={"uri": (uris["law"], f"file://{uris['law']}")})
        with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as stack:
            print(f"stack up at {stack.address}; sending {args.cases} requests (seed {args.seed})", flush=True)
            report, serving = fuzz(stack.address, args.cases, args.seed, options, args.timeout_s, token=token)
    totals = report.totals()
    result = {"cases": args.cases, "seed": args.seed, "seconds": round(time.monotonic() - started, 1),
              "totals": dict(totals), "histogram": {m: dict(c) for m, c in sorted(report.histogram.items())},
              "internal_or_unknown": sum(totals[c] for c in BAD), "hangs": totals[HANG], "still_serving": serving,
              "bad": report.bad[:20]}
    if args.json:
        print_json(result)
    else:
        codes = sorted(totals, key=lambda c: -totals[c])
        rows = [(m, *(report.histogram[m].get(c, 0) for c in codes)) for m in sorted(report.histogram)]
        print(format_table(("method", *codes), [*rows, ("total", *(totals[c] for c in codes))]))
        print(f"INTERNAL or UNKNOWN: {result['internal_or_unknown']}, hangs: {result['hangs']}, "
              f"still serving afterwards: {'yes' if serving else 'NO'} ({result['seconds']} s)")
        for bad in report.bad[:10]:
            print(f"  {bad['method']} -> {bad['code']}: {bad['details'][:160]}\n    sent: {bad['request'][:200]}")
    ok = serving and not result["internal_or_unknown"] and not result["hangs"]
    return 0 if ok else 1
