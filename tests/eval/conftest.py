"""Fixtures for the evaluation tests: the synthetic data set is built once per session."""

from __future__ import annotations

import pytest
from evaldata import SyntheticData, build_synthetic


@pytest.fixture(scope="session")
def synthetic() -> SyntheticData:
    return build_synthetic()
