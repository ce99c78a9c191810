"""Exact local terms: exact softmax weights for each query's window, sinks and block, FAVOR's
estimate for every other key (one normaliser)."""
