"""monitor.py and what train.py does with it: ETA, spikes, GPU memory report, a torch.compile that cannot build."""
import pytest
import torch

import monitor
from monitor import Clock, SpikeWatch, compile_failure, count, duration, gpu_report


# --- units

def test_formats():
    assert [duration(s) for s in (12.34, 245, 7620)] == ["12.3s", "4m05s", "2h07m"]
    assert [count(n) for n in (512, 3072, 204_800_000, 10 ** 10)] == ["512", "3.07K", "204.80M", "10.00B"]


def test_eta_ignores_the_warm_up_steps(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(monitor.time, "time", lambda: now[0])
    clock = Clock(iter_num=10, max_iters=110, elapsed=50.0)  # resumed at iter 10 after 50 s
    now[0] += 30.0  # the first steps compile: slow
    for it in range(11, 10 + monitor.ETA_WARMUP_STEPS):
        assert clock.eta(it) is None
    assert clock.eta(10 + monitor.ETA_WARMUP_STEPS) is None  # the mark: timing starts here
    now[0] += 20.0  # then 2 s per step for 10 steps
    assert clock.eta(10 + monitor.ETA_WARMUP_STEPS + 10) == pytest.approx(2.0 * (110 - 25))
    assert clock.elapsed() == pytest.approx(100.0)


def test_a_spike_is_reported_once():
    watch = SpikeWatch(factor=2.0)
    values = [5.0, 4.0] * 10 + [11.0, 12.0, 4.0, 4.5, 13.0]  # median 4.5: one spike of two steps, then another
    reports = [(i, watch.check(v)) for i, v in enumerate(values)]
    assert [i for i, m in reports if m is not None] == [20, 24] and reports[20][1] == 4.5
    quiet = SpikeWatch(factor=0.0)  # 0 = off
    assert all(quiet.check(v) is None for v in values)
    early = SpikeWatch(factor=2.0)  # too little history (after a start or a resume): no verdict yet
    assert all(early.check(v) is None for v in [1.0] * (monitor.SPIKE_MIN_HISTORY - 1) + [100.0])


def test_gpu_report_warns_when_memory_is_taken(monkeypatch):
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 4070")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(11.2 * gib), 12 * gib))
    assert gpu_report("cuda") == ["GPU NVIDIA GeForce RTX 4070: 12.0 GiB, 11.2 GiB free"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * gib, 12 * gib))
    lines = gpu_report("cuda")
    assert len(lines) == 2 and lines[1].startswith("warning: 7.0 GiB of the GPU's 12.0 GiB are in use")


def test_compile_failure_names_the_cause_and_the_fix():
    inner = RuntimeError("fatal error: Python.h: No such file or directory\ncompilation terminated.")
    outer = RuntimeError("backend failed")
    outer.__cause__ = inner
    line = compile_failure(outer)
    assert "RuntimeError: fatal error: Python.h: No such file or directory)" in line and "python3-dev" in line
    assert "\n" not in line and line.endswith("or set compile=False")
    assert "build-essential" in compile_failure(RuntimeError("Failed to find C compiler. Please specify via CC"))
