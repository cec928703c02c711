"""Benchmarks that print JSON: ``python -m bench.<name>`` from the repository root (bench/README.md)."""
