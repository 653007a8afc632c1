"""Benchmarks: each prints ratios between arms run interleaved in one run."""
