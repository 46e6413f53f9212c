"""Registering ccoe.v1.Inference with a gRPC server (Ray Serve's proxy calls this).

The same as the generated add_InferenceServicer_to_server, except for one thing: a request
that does not parse (a string field with bad UTF-8, truncated bytes) would make grpcio answer
UNKNOWN before any of our code runs. Here it parses into an empty request that carries the
reason under a reserved metadata key, and the router answers INVALID_ARGUMENT with it.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from ccoe_common.pb import inference_pb2 as pb

SERVICE = "ccoe.v1.Inference"
DECODE_ERROR_KEY = "__ccoe_decode_error__"


def _lenient_request(data: bytes) -> pb.GenerateRequest:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        return pb.GenerateRequest(metadata={DECODE_ERROR_KEY: str(e)})


def add_inference_servicer(servicer, server) -> None:
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient_request,
            response_serializer=pb.GenerateStreamResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
