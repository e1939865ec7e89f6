"""Shared fixtures of the test suite."""

import pytest

from kind_fast.testing import single_thread


@pytest.fixture
def one_thread():
    """Tests of small models: one intra-op thread (see kind_fast.testing.single_thread)."""
    with single_thread():
        yield
