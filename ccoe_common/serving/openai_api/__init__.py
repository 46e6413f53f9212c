"""The OpenAI-compatible HTTP API: a second front door on the router, beside gRPC.

An HTTP request becomes the same `ccoe.v1.GenerateRequest` a gRPC client would send, and
goes through the same `RouterCore.generate` / `generate_stream` (routing, admission,
retries, version pinning), so both doors give the same tokens, statuses and messages:

    protocol.py   OpenAI request bodies (validated) -> GenerateRequest; `model` -> route
    responses.py  GenerateResponse / stream messages -> OpenAI JSON objects and chunks
    errors.py     CCoEError -> HTTP status and OpenAI's error object
    sse.py        server-sent events framing, ending with `data: [DONE]`
    frontend.py   the handler Ray Serve's HTTP ingress calls: auth, dispatch, streaming
"""
