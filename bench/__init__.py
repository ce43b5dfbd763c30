"""Benchmarks: accuracy and speed of kdcore's methods on real data (not run by the test suite)."""
