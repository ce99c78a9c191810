"""Imported by test_sigkill's forkserver: favor imported and the corpus cached once."""

from ._child import warm

warm()
