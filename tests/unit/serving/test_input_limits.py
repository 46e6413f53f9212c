"""Every GenerateRequest field a client can make large is bounded by RouterConfig, refused with
INVALID_ARGUMENT naming the field and the setting, quoting at most a short prefix; the edge
cuts any message to what gRPC's trailers carry."""

from __future__ import annotations

import pytest

from ccoe_common.errors import InvalidRequest, quote
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.config import AppConfig, ConfigError, RouterConfig
from ccoe_common.serving.grpc_convert import parse_request
from ccoe_common.serving.grpc_status import MAX_DETAILS_BYTES, clip_details

LIMITS = RouterConfig(max_metadata_keys=4, max_metadata_key_chars=8, max_metadata_value_chars=16,
                      max_metadata_bytes=40, max_domain_chars=8, max_stop_strings=2, max_stop_chars=4,
                      max_request_id_chars=8, max_messages=2, max_prompt_chars=100)


def chat(*pairs: tuple[str, str]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs])


AT_THE_LIMITS = {"prompt": "p" * 100, "metadata": {"k1": "v" * 16, "k2": "x"}, "domain": "d" * 8, "stop": ["abcd", "e"],
                     "request_id": "r" * 8, "expert": pb.ExpertRef(name="law")}


def test_requests_at_the_limits_pass():
    query, base = parse_request(pb.GenerateRequest(**AT_THE_LIMITS), LIMITS)
    assert (query.domain, base.sampling.stop, base.request_id) == ("d" * 8, ("abcd", "e"), "r" * 8)
    parse_request(pb.GenerateRequest(messages=chat(("user", "x" * 90), ("bot", "y"))), LIMITS)


@pytest.mark.parametrize(("change", "field", "fragment"), [
    ({"metadata": {f"k{i}": "v" for i in range(5)}}, "metadata", "5 keys, over router.max_metadata_keys (4)"),
    ({"metadata": {"k" * 9: "v"}}, "metadata", "is longer than router.max_metadata_key_chars (8)"),
    ({"metadata": {"k": "v" * (32 << 20)}}, "metadata['k']", "(33554432 characters) is longer than "
                                                               "router.max_metadata_value_chars (16)"),
    ({"metadata": {"a": "x" * 16, "b": "y" * 16, "c": "z" * 16}}, "metadata",
     "51 bytes of keys and values, over router.max_metadata_bytes (40)"),
    ({"domain": "d" * (8 << 20)}, "domain", "(8388608 characters) is longer than router.max_domain_chars (8)"),
    ({"stop": ["a", "b", "c"]}, "stop", "3 strings, over router.max_stop_strings (2)"),
    ({"stop": ["a", "x" * 170_000]}, "stop[1]", "(170000 characters) must be 1 to 4 characters"),
    ({"stop": [""]}, "stop[0]", "'' must be 1 to 4 characters"),
    ({"request_id": "r" * 9}, "request_id", "is longer than router.max_request_id_chars (8)"),
    ({"expert": pb.ExpertRef(name="Law" * 1000)}, "expert.name", "is not an expert name"),
    ({"prompt": "p" * 101}, "prompt", "has 101 characters; the limit is 100 (router.max_prompt_chars)"),
])
def test_each_limit_names_its_field_and_setting(change, field, fragment):
    with pytest.raises(InvalidRequest) as err:
        parse_request(pb.GenerateRequest(**{**AT_THE_LIMITS, **change}), LIMITS)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.param == field
    assert fragment in str(err.value) and len(str(err.value)) < 250, str(err.value)


@pytest.mark.parametrize(("messages", "fragment"), [
    (chat(("user", "a"), ("user", "b"), ("user", "c")), "3 messages, over router.max_messages (2)"),
    (chat(("r" * 95, "x" * 6)), "has 101 characters; the limit is 100"),  # roles count: templates render them
])
def test_chat_messages_are_bounded_with_their_roles(messages, fragment):
    with pytest.raises(InvalidRequest, match="^messages: ") as err:
        parse_request(pb.GenerateRequest(messages=messages), LIMITS)
    assert fragment in str(err.value)


def test_the_reserved_key_of_old_is_ordinary_metadata():
    query, _ = parse_request(pb.GenerateRequest(prompt="hi", metadata={"__ccoe_decode_error__": "boom"}),
                             RouterConfig())
    assert query.metadata == {"__ccoe_decode_error__": "boom"}


def test_limits_are_validated_config_with_bounds():
    assert RouterConfig().max_stop_strings == 16 and RouterConfig().max_metadata_keys == 64
    with pytest.raises(ConfigError, match="router.max_stop_strings: Input should be less than or equal to 16"):
        AppConfig.load({"backbone": "/m", "router": {"max_stop_strings": 17}})
    with pytest.raises(ConfigError, match="router.max_domain_chars"):
        AppConfig.load({"backbone": "/m", "router": {"max_domain_chars": 0}})


def test_quote_keeps_a_short_prefix_and_says_how_long():
    assert quote("abcdef", limit=3) == "'abc'… (6 characters)"
    assert quote("short") == "'short'"
    assert quote(b"\xff" * 100, limit=2) == "b'\\xff\\xff'… (100 bytes)"
    assert len(quote(["x" * 10_000])) < 120


def test_the_edge_cuts_any_message_to_fit_grpc_trailers():
    assert clip_details("fine") == "fine"
    long = "prompt: " + "é" * 100_000
    clipped = clip_details(long)
    assert len(clipped.encode()) <= MAX_DETAILS_BYTES and clipped.startswith("prompt: ééé")
    assert clipped.endswith("(200008 bytes, cut)")
