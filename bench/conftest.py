"""Micro-benchmark fixtures. Benchmarks use the user's sdfast cache (models and exported
engines are reused between runs) and the torch thread count given by SDFAST_BENCH_THREADS
(default: torch's own choice)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _threads():
    threads = os.environ.get("SDFAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    yield
