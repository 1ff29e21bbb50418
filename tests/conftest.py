"""Shared test settings: one torch thread, deterministic defaults.

One thread: test batches are tiny, and with Ray workers and other processes sharing two cores,
two intra-op threads made small steps many times slower (see docs/benchmarks.md).
"""

import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    """A test module that attached this process to a Ray (a job's `ensure_ray` run in-process) leaves
    it for the next module's private Ray to collide with ("ray.init twice"): shut it down after
    every module."""
    yield
    ray = sys.modules.get("ray")  # only when something imported Ray: most modules never do
    if ray is not None and ray.is_initialized():
        ray.shutdown()
