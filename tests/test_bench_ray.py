"""Benchmarks 4 (ray_overhead) and 5 (eval_fanout) at --tiny size: they run end to end on a real
local Ray, print a ratio and the command, and their correctness checks hold (numbers not judged)."""

from __future__ import annotations

import math

import pytest
import ray

from bench import eval_fanout, ray_overhead
from bench.common import Timing


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow  # starts Ray
def test_ray_overhead_tiny(tmp_path, capsys):
    out = tmp_path / "ro.json"
    result = ray_overhead.main(["--tiny", "--json", str(out)])
    text = capsys.readouterr().out
    assert "ratio ray_1w_epoch/plain_epoch = " in text
    assert "command: PYTHONPATH=. python bench/ray_overhead.py --tiny --json" in text
    assert result["ratio_name"] == "ray_1w_epoch/plain_epoch"
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    t = result["timings"]
    # The Ray epoch time is the worker's own measurement: a real epoch, shorter than the whole fit.
    assert 0 < t["ray_1w_2cpu_epoch"]["median"] < t["ray_1w_2cpu_fit_wall"]["median"]
    assert t["plain_2threads_epoch"]["median"] > 0
    assert out.is_file() and '"bench": "ray_overhead"' in out.read_text()
    assert not ray.is_initialized()


@pytest.mark.slow  # starts Ray
def test_eval_fanout_tiny(capsys):
    result = eval_fanout.main(["--tiny"])
    text = capsys.readouterr().out
    assert "ratio seq_1thread/fanout_2x1cpu (speedup) = " in text
    assert "command: PYTHONPATH=. python bench/eval_fanout.py --tiny" in text
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    extra = result["extra"]
    # Every timed call (fan-out and sequential) gave the same correct counts (asserted in the bench).
    assert extra["accuracies_equal"].startswith("True (fan-out calls checked: 2, sequential calls: 4)")
    assert "natural/transfer/t0=" in extra["correct/n"] and "fgsm/eot/t0=" in extra["correct/n"]
    for part in extra["correct/n"].split(", "):
        correct, n = part.split("=")[1].split("/")
        assert int(n) == 32 and 0 <= int(correct) <= 32
    assert not ray.is_initialized()
    assert result["ratio_name"] == "seq_1thread/fanout_2x1cpu (speedup)"
    for key in (
        "speedup seq_2threads/fanout",
        "bound on seq_2threads/fanout with 2 cores",
        "fan-out parallel efficiency (seq_1thread / cores / fanout)",
    ):
        assert float(extra[key]) > 0


def test_fanout_bound_and_efficiency_from_paired_rounds():
    """The ceiling over the 2-thread run is cores x (seq_2threads / seq_1thread), per round."""
    seq1 = Timing("seq_1thread", 10, seconds=[7.2, 7.4, 7.0])
    seq2 = Timing("seq_2threads", 10, seconds=[5.0, 5.2, 4.9])
    fan = Timing("fanout", 10, seconds=[4.0, 3.7, 3.5])
    # per-round seq2/seq1 = 0.694, 0.703, 0.700 -> median 0.700 (4.9 / 7.0); x 2 cores
    assert eval_fanout.fanout_bound(seq1, seq2, 2) == pytest.approx(1.4)
    # per-round seq1/fan = 1.8, 2.0, 2.0 -> median 2.0 -> perfect use of 2 cores
    assert eval_fanout.parallel_efficiency(seq1, fan, 2) == pytest.approx(1.0)
