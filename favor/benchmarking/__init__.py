"""Measuring favor: timing and peak memory against exact attention (``timing``) and the
approximation error of each kernel against exact softmax attention (``approximation``).

Used by ``favor bench``, ``favor demo`` and the scripts in ``benchmarks/``. Library code:
results are lists of dicts, nothing is printed. Submodules are imported on use, so that
``import favor.benchmarking.approximation`` does not start the timing machinery.
"""
