"""Benchmarks: step throughput against a PyTorch reference (`python -m benchmarks.throughput`)."""
