"""Shared helpers: tiny sweeps on synthetic data."""

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

FAST = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--quiet"]
"""Flags that make a sweep trial take about a second on a laptop CPU."""


@pytest.fixture
def fast_args():
    return list(FAST)
