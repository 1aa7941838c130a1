"""Benchmarks: the load benchmark, the side-by-side comparison with llama-server, and their tooling."""
