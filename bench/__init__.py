"""Benchmarks of the library, measured through its own API (`odenet.train.fit`).

`python -m bench`: what a training epoch costs per model and lever, against a reference loop
written like torchdiffeq's MNIST example. `python -m bench.time_to_accuracy`: time to a
target accuracy over seeds, per lever. Both write their section of BENCHMARKS.md.
"""
