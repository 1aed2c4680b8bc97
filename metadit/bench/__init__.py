"""Benchmarks: variants measured side by side in one run (interleaved), reported as ratios."""

from metadit.bench.build import bench_build
from metadit.bench.core import bench_core
from metadit.bench.gen import bench_gen
from metadit.bench.likelihood import bench_likelihood

BENCHMARKS = {"build": bench_build, "core": bench_core, "gen": bench_gen, "likelihood": bench_likelihood}

__all__ = ["BENCHMARKS", "bench_build", "bench_core", "bench_gen", "bench_likelihood"]
