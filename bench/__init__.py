"""Benchmarks of this project's trainer, data path and samplers against the tutorial's way: `python -m bench`."""
