"""Shared fixtures, the hypothesis profiles and the test device.

Hypothesis profiles (property tests, ``tests/**/test_properties*.py``):
- ``default``: a bounded number of examples per property, derandomised (the same cases on
  every run, so the suite is reproducible and its time bounded);
- ``slow``: many more examples, freshly random each run, for hunting edge cases:
  ``HYPOTHESIS_PROFILE=slow python -m pytest -q tests -k properties``.
Add ``--hypothesis-show-statistics`` to see how many cases each property ran.

Device: ``FAVOR_TEST_DEVICE=cuda python -m pytest -q -m device`` runs the tests that take
the ``device`` fixture (reference comparisons, float16/bfloat16, decoding) on that device.
Without the variable they run on the CPU like every other test.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The suite is thousands of small ops: one intra-op thread avoids OpenMP spin-waiting, which
# made it ~8x slower on a busy 2-core machine (measured: 115 s vs 14 s for one test file).
torch.set_num_threads(1)

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")),
    deadline=None,  # timings on a shared 2-core machine are noise, not a property
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "1000")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _test_device() -> torch.device:
    name = os.environ.get("FAVOR_TEST_DEVICE", "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise pytest.UsageError(f"FAVOR_TEST_DEVICE={name!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        # never fall back silently: a GPU check that ran on the CPU would report a false pass
        raise pytest.UsageError(f"FAVOR_TEST_DEVICE={name!r} but torch.cuda.is_available() is False")
    return dev


TEST_DEVICE = _test_device()


def pytest_collection_modifyitems(items):
    # every test that runs on the chosen device carries the ``device`` mark: `-m device`
    # selects exactly the subset that FAVOR_TEST_DEVICE moves
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device():
    """The device under test (FAVOR_TEST_DEVICE, default cpu); session-scoped so that
    hypothesis tests can take it."""
    return TEST_DEVICE


@pytest.fixture
def gen():
    """A fresh, seeded generator: every random draw in a test is reproducible."""
    return torch.Generator().manual_seed(1234)


def randn(gen, *shape, dtype=torch.float64, std=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).mul(std).to(dtype)
