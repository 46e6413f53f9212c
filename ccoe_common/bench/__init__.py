"""Benchmark scripts behind `ccoe bench`: they print ratios measured side by side in one run."""
