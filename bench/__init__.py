"""Benchmarks that measure the library through its own API (`odenet.train.fit`)."""
