"""Benchmarks of dreambooth-fast against eager PyTorch (results in benchmarks/results/)."""
