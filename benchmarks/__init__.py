"""Runnable benchmarks; each module prints its own report."""
