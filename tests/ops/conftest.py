"""Fixtures of the custom-op tests (the ``cuda`` marker and its skip live in tests/conftest.py)."""
import pytest
import torch


@pytest.fixture
def generator():
    """A freshly seeded CPU generator per test."""
    return torch.Generator().manual_seed(20240611)
