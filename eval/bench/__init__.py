"""Benchmarks: ratios measured in one run, each printing the command that reproduces it."""
