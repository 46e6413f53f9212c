"""`ccoe bench serve`: the served stack against the in-process engine, same workload, same run.

N concurrent streaming requests over mixed experts (cycling through the backbone and 5
experts), each with the same prompt length and a fixed number of new tokens (ignore_eos):

- `engine`: N concurrent `Engine.generate` streams in this process;
- `served`: N concurrent gRPC `GenerateStream` calls on loopback through Ray Serve's gRPC
  proxy, the Router and the ModelReplica (the local stack, one replica, the same engine config);
- `http`: the same requests as N concurrent streamed `POST /v1/completions` calls to the
  OpenAI-compatible API on the same stack (Ray Serve's HTTP proxy, the same Router and replica),
  read as server-sent events.

Rounds rotate the order of the systems (engine, served, http; served, http, engine; ...) so that
machine noise hits all alike; each reports the median round. TTFT is measured by the client
from sending the request to the first message (SSE event) carrying a token; inter-token
latency from the gaps between a stream's messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ccoe_common.auth.client import bearer_metadata
from ccoe_common.bench.memory import SHAPES
from ccoe_common.console import Progress, add_json_flag, format_table, print_json, stdout_to_stderr
from ccoe_common.engine.engine import Engine, EngineConfig
from ccoe_common.engine.params import GenerationRequest, SamplingParams
from ccoe_common.model import CCoEModel
from ccoe_common.model.synthetic import make_checkpoint
from ccoe_common.ports import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

EXPERTS = ("d0", "d1", "d2", "d3", "d4")
TARGET = 0.85
SYSTEMS = ("engine", "served", "http")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="150m", help="backbone shape (default 150m)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming requests (default 16)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per system, alternating (default 3)")
    parser.add_argument("--quick", action="store_true", help="8 clients, 32 new tokens, 2 rounds (< 5 min)")
    add_json_flag(parser)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _assets(shape: str, work: Path) -> tuple[Path, list[str]]:
    backbone = make_checkpoint(work / "backbone", "qwen2", dtype=torch.bfloat16, **SHAPES[shape])
    model = CCoEModel.from_pretrained(backbone, dtype=torch.bfloat16)
    uris = []
    for i, name in enumerate(EXPERTS):
        expert = model.carve(name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-3)
        uris.append(str(work / "experts" / name))
        expert.to_artifact(uris[-1], model.info)
    return backbone, uris


def _requests(n: int, prompt_tokens: int, new_tokens: int, tokenizer, round_no: int) -> list[dict[str, Any]]:
    """Prompts as text (both systems tokenise the same text), routes cycling backbone + experts."""
    gen = torch.Generator().manual_seed(round_no)
    routes = (None, *EXPERTS)
    vocab = len(tokenizer)
    prompts = [tokenizer.decode(torch.randint(10, vocab - 1, (prompt_tokens,), generator=gen).tolist())
               for _ in range(n)]
    return [{"prompt": p, "expert": routes[i % len(routes)], "new_tokens": new_tokens} for i, p in enumerate(prompts)]


async def _timed(stream: AsyncIterator[Any], start: float | None = None) -> tuple[int, float, list[float]]:
    """Consume one stream of deltas/messages: (tokens, time to first, gaps between the rest).
    `start` is when the request was sent, if before the stream was opened."""
    start = last = time.perf_counter() if start is None else start
    ttft, gaps, tokens = None, [], 0
    async for item in stream:
        now = time.perf_counter()
        if ttft is None:
            ttft = now - start
        else:
            gaps.append(now - last)
        last = now
        tokens += len(item.token_ids)
    return tokens, ttft or 0.0, gaps


async def _engine_round(engine: Engine, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    def stream(r: dict[str, Any]) -> AsyncIterator[Any]:
        params = SamplingParams(max_new_tokens=r["new_tokens"], ignore_eos=True)
        return engine.generate(GenerationRequest(prompt=r["prompt"], expert=r["expert"], sampling=params))

    start = time.perf_counter()
    results = await asyncio.gather(*(_timed(stream(r)) for r in reqs))
    return _round(results, time.perf_counter() - start, failed=0)


async def _served_round(address: str, token: str | None, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    import grpc

    from ccoe_common.pb import inference_pb2 as pb
    from ccoe_common.pb import inference_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(r: dict[str, Any]) -> tuple[int, float, list[float]] | None:
            request = pb.GenerateRequest(prompt=r["prompt"], max_tokens=r["new_tokens"],
                                         sampling=pb.SamplingParams(ignore_eos=True))
            if r["expert"]:
                request.expert.name = r["expert"]
            try:
                return await _timed(stub.GenerateStream(request, timeout=600,
                                                        metadata=bearer_metadata(token) if token else None))
            except grpc.aio.AioRpcError:
                return None

        start = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in reqs))
    ok = [r for r in results if r is not None]
    return _round(ok, time.perf_counter() - start, failed=len(results) - len(ok))


@dataclass(frozen=True)
class _Chunk:
    token_ids: list[int]


async def _sse_tokens(response: Any) -> AsyncIterator[_Chunk]:
    """The token-carrying chunks of an OpenAI SSE stream (aiohttp response), as they arrive."""
    async for line in response.content:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[len(b"data: "):])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        ids = [t for c in event["choices"] for t in c.get("token_ids", [])]
        if ids:
            yield _Chunk(ids)


async def _http_round(base_url: str, token: str | None, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    import aiohttp

    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(r: dict[str, Any]) -> tuple[int, float, list[float]] | None:
            body = {"model": r["expert"] or "backbone", "prompt": r["prompt"], "max_tokens": r["new_tokens"],
                    "temperature": 0, "stream": True, "ignore_eos": True}
            sent = time.perf_counter()  # the reply's headers wait for the first token: TTFT counts from here
            try:
                async with session.post(f"{base_url}/completions", json=body, headers=headers) as response:
                    if response.status != 200:
                        return None
                    return await _timed(_sse_tokens(response), start=sent)
            except (aiohttp.ClientError, RuntimeError):
                return None

        start = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in reqs))
    ok = [r for r in results if r is not None]
    return _round(ok, time.perf_counter() - start, failed=len(results) - len(ok))


def _round(results: list[tuple[int, float, list[float]]], seconds: float, failed: int) -> dict[str, Any]:
    return {"tokens": sum(r[0] for r in results), "seconds": seconds, "ttft": [r[1] for r in results],
            "itl": [g for r in results for g in r[2]], "failed": failed}


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.clients, args.new_tokens, args.rounds = 8, 32, 2
    torch.set_num_threads(2)
    progress = Progress(2 + len(SYSTEMS) * args.rounds, quiet=False)
    engine_cfg = EngineConfig(max_seq_len=args.prompt_tokens * 4 + args.new_tokens + 64,
                              max_running=args.clients, max_batched_tokens=max(256, args.clients),
                              prefill_chunk=256)
    rounds: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    with tempfile.TemporaryDirectory(prefix="ccoe-bench-serve-") as tmp, stdout_to_stderr(args.json):
        backbone, uris = _assets(args.shape, Path(tmp))
        progress.step(f"{args.shape} backbone and {len(uris)} experts written")
        model = CCoEModel.from_pretrained(backbone, dtype=torch.bfloat16)
        for uri in uris:
            model.push(uri)
        config = AppConfig.load({"backbone": str(backbone), "experts": uris,
                                 "replica": {"dtype": "bfloat16", "engine": engine_cfg.model_dump()},
                                 "auth": {"mode": "token"}})
        with Engine(model, engine_cfg) as engine, \
                LocalStack(config, grpc_port=free_port(), http_port=free_port()) as stack:
            progress.step("engine and local stack up")
            warm = _requests(min(4, args.clients), args.prompt_tokens, 4, model.tokenizer, 999)
            asyncio.run(_engine_round(engine, warm))
            asyncio.run(_served_round(stack.address, stack.inference_token, warm))
            asyncio.run(_http_round(stack.http_base_url, stack.inference_token, warm))
            for i in range(args.rounds):
                reqs = _requests(args.clients, args.prompt_tokens, args.new_tokens, model.tokenizer, i)
                for system in SYSTEMS[i % len(SYSTEMS):] + SYSTEMS[:i % len(SYSTEMS)]:
                    if system == "engine":
                        result = asyncio.run(_engine_round(engine, reqs))
                    elif system == "served":
                        result = asyncio.run(_served_round(stack.address, stack.inference_token, reqs))
                    else:
                        result = asyncio.run(_http_round(stack.http_base_url, stack.inference_token, reqs))
                    rounds[system].append(result)
                    progress.step(f"round {i + 1}: {system} {result['tokens'] / result['seconds']:.1f} tokens/s")
    report = _report(args, rounds)
    if args.json:
        print_json(report)
    else:
        print(_render(report))
    return 0


def _report(args: argparse.Namespace, rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def rate(system: str) -> float:
        return statistics.median(r["tokens"] / r["seconds"] for r in rounds[system])

    served = rounds["served"]
    ttft = [t for r in served for t in r["ttft"]]
    itl = [g for r in served for g in r["itl"]]
    engine_ttft = [t for r in rounds["engine"] for t in r["ttft"]]
    engine_itl = [g for r in rounds["engine"] for g in r["itl"]]
    http_ttft = [t for r in rounds["http"] for t in r["ttft"]]
    http_itl = [g for r in rounds["http"] for g in r["itl"]]
    return {
        "served_tokens_per_s": rate("served"),
        "engine_tokens_per_s": rate("engine"),
        "ratio": rate("served") / rate("engine"),
        "target": TARGET,
        "ttft_p50_ms": _percentile(ttft, 50) * 1e3, "ttft_p99_ms": _percentile(ttft, 99) * 1e3,
        "itl_p50_ms": _percentile(itl, 50) * 1e3, "itl_p99_ms": _percentile(itl, 99) * 1e3,
        "engine_ttft_p50_ms": _percentile(engine_ttft, 50) * 1e3,
        "engine_ttft_p99_ms": _percentile(engine_ttft, 99) * 1e3,
        "engine_itl_p50_ms": _percentile(engine_itl, 50) * 1e3, "engine_itl_p99_ms": _percentile(engine_itl, 99) * 1e3,
        "failed_requests": sum(r["failed"] for r in served),
        "requests": len(ttft) + sum(r["failed"] for r in served),
        "http_tokens_per_s": rate("http"),
        "http_ratio": rate("http") / rate("engine"),
        "http_ttft_p50_ms": _percentile(http_ttft, 50) * 1e3, "http_ttft_p99_ms": _percentile(http_ttft, 99) * 1e3,
        "http_itl_p50_ms": _percentile(http_itl, 50) * 1e3, "http_itl_p99_ms": _percentile(http_itl, 99) * 1e3,
        "http_failed_requests": sum(r["failed"] for r in rounds["http"]),
        "http_requests": len(http_ttft) + sum(r["failed"] for r in rounds["http"]),
        "workload": {"shape": args.shape, "dtype": "bfloat16", "clients": args.clients,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
                     "routes": ["backbone", *EXPERTS], "torch_threads": 2},
    }


def _render(r: dict[str, Any]) -> str:
    w = r["workload"]
    head = (f"{w['clients']} concurrent streams, {w['shape']} bf16, {w['prompt_tokens']} prompt + {w['new_tokens']} "
            f"new tokens, routes cycling backbone + 5 experts, {w['rounds']} alternating rounds")
    rows = [
        ("engine (in process)", f"{r['engine_tokens_per_s']:.1f}", f"{r['engine_ttft_p50_ms']:.0f}",
         f"{r['engine_ttft_p99_ms']:.0f}", f"{r['engine_itl_p50_ms']:.1f}", f"{r['engine_itl_p99_ms']:.1f}", "0"),
        ("served (gRPC stack)", f"{r['served_tokens_per_s']:.1f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}",
         f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}", str(r["failed_requests"])),
        ("http (OpenAI API)", f"{r['http_tokens_per_s']:.1f}", f"{r['http_ttft_p50_ms']:.0f}",
         f"{r['http_ttft_p99_ms']:.0f}", f"{r['http_itl_p50_ms']:.1f}", f"{r['http_itl_p99_ms']:.1f}",
         str(r["http_failed_requests"])),
    ]
    table = format_table(("system", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "failed"),
                         rows)
    def verdict(ratio: float) -> str:
        return f"{ratio:.3f} (target >= {TARGET}) {'PASS' if ratio >= TARGET else 'FAIL'}"

    return (f"{head}\n\n{table}\n\nserved / engine = {verdict(r['ratio'])}\n"
            f"http / engine = {verdict(r['http_ratio'])}")
