"""Measuring favor: timing and peak memory against exact attention (``timing``), the
approximation error of each kernel against exact softmax attention (``approximation``),
``favor bench``'s grid, crossovers, report and plot (``speed``) and its tables as text
(``tables``).

Used by ``favor bench``, ``favor demo`` and the scripts in ``benchmarks/``. Library code:
results are lists of dicts; text goes to the ``echo`` a caller passes. Submodules are
imported on use, so that ``import favor.benchmarking.approximation`` does not start the
timing machinery.
"""
