"""The engine process's heap settings (streaming/engine/heap.py): a step's few-MB tensors reuse freed memory instead
of taking fresh pages from the kernel every step."""

import subprocess
import sys

import pytest

# A step-like pattern: a dozen ~5 MB tensors made, written and freed, again and again; minor page faults per step
# after a warm-up. 60 MB is ~14,600 pages: with the settings, a step should touch almost no fresh page.
STEPS = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from mimo_voice.streaming.engine.heap import keep_freed_memory
    assert keep_freed_memory()
def step():
    kept = [torch.ones(1_250_000 + 1000 * i) for i in range(12)]
    return sum(float(t[-1]) for t in kept)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_heap_gives_a_repeated_step_no_fresh_pages():
    pages = 12 * 1_250_000 * 4 / 4096
    kept = faults_per_step("kept")
    assert kept < 0.05 * pages, f"{kept:.0f} page faults per step with the heap kept"
    assert kept < faults_per_step("default")  # what the settings are for: the default heap faults more


def test_the_engine_worker_keeps_its_heap_unless_told_not_to(monkeypatch):
    from mimo_voice.configs import load_config
    from mimo_voice.streaming.engine import worker

    calls = []
    monkeypatch.setattr(worker, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(worker, "setup_logging", lambda level: None)  # this process's logging stays as it is
    monkeypatch.setattr(worker.torch, "set_num_threads", lambda threads: None)
    worker._setup(load_config(None, ["model.device=cpu"]))
    worker._setup(load_config(None, ["model.device=cpu", "engine.keep_freed_memory=false"]))
    assert calls == ["kept"]
