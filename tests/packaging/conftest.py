"""Fixtures for the packaging tests."""

from __future__ import annotations

import pytest
from packaging_helpers import load_script


@pytest.fixture(scope="session")
def generate():
    return load_script("generate.py")
