"""pipelines.local_ray: a local Ray that does not start in time is one line and exit 2 (fast: Ray faked)."""

from __future__ import annotations

import inspect
import os
import time

import pytest
from ray._private import node as ray_node
from ray._private import services

from jobs.cli import run_main
from pipelines.local_ray import (
    DEFAULT_START_TIMEOUT_S,
    GCS_PORT_WAIT_ENV,
    START_TIMEOUT_ENV,
    RayStartTimeout,
    init_local_ray,
    start_timeout_s,
)
from rna_core.errors import ConfigError


@pytest.fixture(autouse=True)
def gcs_wait_restored(monkeypatch):
    """init_local_ray sets Ray's GCS port wait in os.environ: put it back after each test."""
    monkeypatch.delenv(GCS_PORT_WAIT_ENV, raising=False)


def test_the_timeout_comes_from_the_environment_and_bad_values_are_refused():
    assert start_timeout_s({}) == DEFAULT_START_TIMEOUT_S == 120.0
    assert start_timeout_s({START_TIMEOUT_ENV: " 300 "}) == 300.0
    for bad in ("0", "-5", "soon", "inf", "nan"):
        with pytest.raises(ConfigError, match=f"{START_TIMEOUT_ENV}='{bad}' is not a number of seconds > 0"):
            start_timeout_s({START_TIMEOUT_ENV: bad})


def test_rays_node_start_looks_the_node_up_through_the_function_we_make_patient():
    """Ray's fixed 30 s loop calls `ray._private.services.get_node` by attribute on each try: what
    init_local_ray replaces. A Ray upgrade that changes this fails here, not under load."""
    source = inspect.getsource(ray_node.Node.__init__)
    assert "ray._private.services.get_node(" in source and "raylet_start_wait_time_s = 30" in source


def fake_start(misses: int, calls: list):
    """A ray.init whose node appears in the GCS after `misses` lookups (as Ray's start loop sees it)."""

    def lookup(*args):
        calls.append(args)
        if len(calls) <= misses:
            raise RuntimeError("node info not available")
        return {"node_id": args[1]}

    def init(**kwargs):
        assert kwargs == {"address": "local", "num_cpus": 2}
        return services.get_node("127.0.0.1:1", "n1")  # Ray: raises after 30 s of misses; here patient

    return lookup, init


def test_a_node_that_registers_late_is_waited_for(monkeypatch):
    calls: list = []
    lookup, init = fake_start(3, calls)
    monkeypatch.setattr(services, "get_node", lookup)
    monkeypatch.setenv(START_TIMEOUT_ENV, "30")
    init_local_ray(init, address="local", num_cpus=2)
    assert len(calls) == 4 and services.get_node is lookup  # retried, then Ray's function put back


def test_a_node_that_never_registers_is_one_line_and_exit_2(monkeypatch, capsys):
    calls: list = []
    lookup, init = fake_start(10**9, calls)
    monkeypatch.setattr(services, "get_node", lookup)
    monkeypatch.setenv(START_TIMEOUT_ENV, "0.5")

    def job(argv):
        init_local_ray(init, address="local", num_cpus=2)

    assert run_main("train.py", job, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: the local Ray (ray.address=local")
    assert "did not start within 0.5 s" in err[0] and f"set {START_TIMEOUT_ENV} to more seconds" in err[0]
    assert len(calls) > 1 and services.get_node is lookup


def test_rays_own_timeouts_past_the_deadline_become_the_line_and_other_errors_pass(monkeypatch):
    monkeypatch.setenv(START_TIMEOUT_ENV, "0.2")

    def slow_then_bare(**kwargs):
        time.sleep(0.3)
        raise Exception("Timed out waiting for the GCS port file")  # noqa: TRY002 (Ray's kind)

    with pytest.raises(RayStartTimeout, match="did not start within 0.2 s"):
        init_local_ray(slow_then_bare)
    assert os.environ[GCS_PORT_WAIT_ENV] == "1"  # Ray's GCS wait follows ours

    def broken(**kwargs):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        init_local_ray(broken)
