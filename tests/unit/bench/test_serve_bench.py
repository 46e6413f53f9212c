"""`ccoe bench serve` end to end at a toy size: structure and sanity, no timing thresholds."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from ccoe_common.cli.main import main


def test_serve_bench_json_has_every_figure():
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["bench", "serve", "--shape", "tiny", "--clients", "3", "--prompt-tokens", "8",
                   "--new-tokens", "4", "--rounds", "1", "--json"])
    assert rc == 0
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    for key in ("served_tokens_per_s", "engine_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                "itl_p99_ms", "failed_requests", "http_tokens_per_s", "http_ratio", "http_ttft_p50_ms",
                "http_itl_p99_ms", "http_failed_requests"):
        assert key in report, key
    assert report["failed_requests"] == 0 and report["requests"] == 3
    assert report["http_failed_requests"] == 0 and report["http_requests"] == 3
    assert report["served_tokens_per_s"] > 0 and report["engine_tokens_per_s"] > 0 and report["http_tokens_per_s"] > 0
    assert report["http_tokens_per_s"] / report["engine_tokens_per_s"] == pytest.approx(report["http_ratio"])
    for prefix in ("", "http_"):
        assert 0 < report[f"{prefix}ttft_p50_ms"] <= report[f"{prefix}ttft_p99_ms"]
        assert 0 < report[f"{prefix}itl_p50_ms"] <= report[f"{prefix}itl_p99_ms"]
