"""Benchmarks behind ``kvbm bench <name>``: one module per benchmark (see kvbm/commands/bench.py)."""
