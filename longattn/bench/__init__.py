"""Benchmarks: correctness gate first, then speed as a ratio against a baseline timed in the same run."""
