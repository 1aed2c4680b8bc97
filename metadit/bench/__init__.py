"""Benchmarks: variants measured side by side in one run (interleaved), reported as ratios."""

from metadit.bench.core import bench_core

BENCHMARKS = {"core": bench_core}

__all__ = ["BENCHMARKS", "bench_core"]
