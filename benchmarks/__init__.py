"""Benchmarks: run as modules (python -m benchmarks.NAME), not collected as tests."""
