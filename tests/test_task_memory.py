"""GPU evaluation tasks sized from the model's measured memory (issue 18, item 4): the estimate
against the peak an attack really reaches on this CPU, and the default evaluation of WRN-34-10
packed so that it fits a 24 GB GPU (four tasks of 0.25 did not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rna_core import create_model
from rna_core.config import EvalConfig
from rna_core.errors import ConfigError
from rna_core.memory import GIB, USABLE_FRACTION, measure_task_memory, tasks_per_gpu

REPO = Path(__file__).resolve().parents[1]

PEAK_SCRIPT = r"""
import sys, torch
from rna_core import create_model
from rna_core.attacks.pgd import pgd_linf
from rna_core.memory import ALLOCATOR_SLACK, measure_task_memory
torch.set_num_threads(1)
def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
torch.manual_seed(0)
batch = int(sys.argv[2])
model = create_model(sys.argv[1], norm="bn,gns:1").eval()
memory = measure_task_memory(model)
x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
with torch.no_grad():
    model(x)  # warm-up: what the process holds besides the attack
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current size
before = rss("VmRSS:")
pgd_linf(model, x, y, 8 / 255, 2 / 255, 2)
planned = memory.weights + int(ALLOCATOR_SLACK * memory.graph_bytes(batch))
print(rss("VmHWM:") - before, memory.graph_bytes(batch), planned)
"""


@pytest.mark.slow  # a subprocess running a PGD-2 of ResNet-18 at batch 64
def test_the_estimate_brackets_the_peak_memory_of_a_real_attack_on_the_cpu():
    """Peak resident memory of PGD-2 on ResNet-18 (`bn,gns:1`, batch 64), in a fresh process:
    at least the measured graph, at most what a task plans on (weights + slack x graph)."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, "resnet18", "64"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**env, "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, graph, planned = (int(v) for v in proc.stdout.split()[-3:])
    assert graph > 200 * 2**20  # ResNet-18 at batch 64 saves ~4.5 MiB an image
    assert 0.9 * graph <= peak <= planned, (peak, graph, planned)


def test_the_graph_grows_linearly_with_the_batch():
    torch.manual_seed(0)
    model = create_model("small_cnn", norm="bn,gns:1").eval()
    memory = measure_task_memory(model)
    four = measure_task_memory(model, batches=(4, 8))
    assert memory.per_example > 0
    assert abs(four.per_example - memory.per_example) <= 0.02 * memory.per_example
    assert memory.weights == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_wrn34_10s_default_evaluation_is_packed_to_fit_a_24_gb_gpu():
    """batch 256 (the paper presets' eval_batch_size): about 9 GiB a task, so two per GPU, not four."""
    from pipelines.evaluation.fanout import gpu_share

    torch.manual_seed(0)
    model = create_model("wrn34_10", norm="bn,gns:1").eval()
    options = EvalConfig(batch_size=256)
    share, how = gpu_share(options, lambda: model, (3, 32, 32))
    memory = measure_task_memory(model)
    per_task = memory.peak_bytes(256)
    assert 5 * GIB < per_task < 12 * GIB, per_task / GIB
    count = int(1 / share + 1e-9)
    assert share > 0.25 and count * per_task <= USABLE_FRACTION * 22.5 * GIB  # 4 x 0.25 would not fit
    assert count == 2 and "2 per 22.5 GiB GPU" in how
    # an 80 GiB GPU takes more of them (at most MAX_TASKS_PER_GPU), and an explicit share is kept
    assert gpu_share(EvalConfig(batch_size=256, gpu_memory_gib=80), lambda: model, (3, 32, 32))[0] == 0.25
    never = lambda: pytest.fail("an explicit share builds no model")  # noqa: E731
    assert gpu_share(EvalConfig(batch_size=256, gpus_per_task=1.0), never, (3, 32, 32)) == (1.0, "eval.gpus_per_task")


def test_a_task_too_large_for_the_gpu_is_refused_in_one_line_with_the_batch_that_fits():
    torch.manual_seed(0)
    memory = measure_task_memory(create_model("resnet18", norm="bn").eval())
    with pytest.raises(ConfigError) as err:
        tasks_per_gpu(memory, 4096, 8 * GIB)
    text = str(err.value)
    assert "\n" not in text and "batch 4096" in text and "eval.batch_size" in text
    fits = int(text.split("to ")[1].split()[0])
    assert 0 < fits < 4096 and tasks_per_gpu(memory, fits, 8 * GIB) == 1


def test_gpus_per_task_is_checked_and_unset_by_default():
    assert EvalConfig().gpus_per_task is None
    with pytest.raises(ConfigError, match="gpus_per_task in"):
        EvalConfig(gpus_per_task=1.5).validate()
    with pytest.raises(ConfigError, match="gpu_memory_gib must be"):
        EvalConfig(gpu_memory_gib=0).validate()
