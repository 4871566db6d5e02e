"""Benchmarks, run as modules from the repository root (``python -m benchmarks.publish``)
so that they import the test kits as the ``tests`` package."""
