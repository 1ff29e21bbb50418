"""Shared test settings: one torch thread, deterministic defaults.

One thread: test batches are tiny, and with Ray workers and other processes sharing two cores,
two intra-op threads made small steps many times slower (see docs/benchmarks.md).
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
