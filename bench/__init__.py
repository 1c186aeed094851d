"""Benchmarks of the scheduler: `python bench/burst.py` and `python bench/idle.py` (see harness.py)."""
