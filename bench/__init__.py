"""Benchmarks and checks that print figures (not shipped with the package)."""
