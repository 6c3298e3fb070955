"""Harnesses for tests and benchmarks: product code run outside its service."""
