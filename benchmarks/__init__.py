"""Reproducible speed and memory measurements of the real engine; entry point: ``python -m benchmarks.run``."""
