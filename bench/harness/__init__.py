"""Harnesses the benchmarks and tests share (not shipped): the deterministic replay and the HTTP accuracy run."""
