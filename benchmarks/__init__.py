"""Benchmark scripts (not installed): ``python -m benchmarks.NAME``. Each prints the machine
and configuration, interleaves contenders, takes medians, and writes JSON + PNG under runs/bench/."""
