"""Benchmarks: AdaScale's step-time overhead and convergence across scales; each writes a table."""
