"""Benchmarks: each prints a ratio against a baseline measured in the same run (docs/performance.md).

A regular package, not a namespace one: pyarrow 17 installs a top-level `benchmarks` package of its own, which
would otherwise shadow this folder for `import benchmarks.gpu_check`."""
