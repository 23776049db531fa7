"""Parley benchmarks: `python -m bench [--quick] [--only NAME] [--database-url URL]`.

Each benchmark measures Parley and a bare baseline in the same run, on a private
Mosquitto, and docs/benchmarks.md is written from the results.
"""
