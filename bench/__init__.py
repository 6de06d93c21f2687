"""Benchmarks: ``python -m bench.serving`` measures the BentoML service under load."""
