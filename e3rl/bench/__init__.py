"""Benchmarks: scripts that print numbers and ratios against a baseline run in the same process."""
