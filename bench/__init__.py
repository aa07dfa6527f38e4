"""Benchmarks. `longtune bench` (runner.py) runs longtune and its peers side by side under one memory cap; the
single-purpose scripts beside it (python bench/<name>.py) measure one mechanism each."""
