"""Benchmarks run by `make bench`: each prints its figures, its target and a baseline from the same run."""
