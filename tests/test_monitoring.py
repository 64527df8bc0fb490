"""monitor.py and what train.py does with it: elapsed time and ETA, spikes, the GPU memory report, a torch.compile
that cannot build, and extending a finished WSD run from stable.pt."""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from conftest import REPO, run_script
from test_train import run_main_in_process

from smallgpt import monitor
import train
from smallgpt.checkpoint import load_checkpoint
from smallgpt.config import load_train_config
from smallgpt.metrics import read_records
from smallgpt.monitor import Clock, SpikeWatch, compile_failure, count, duration, gpu_report
from train import schedule_change


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


# --- through train.py

FAST = ["config/train_tiny.py", "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_iters=2", "--condensation_seqs=2", "--log_interval=1"]


def records(out_dir, kind):
    return [r for r in read_records(out_dir) if r["type"] == kind]


@pytest.mark.slow
def test_log_lines_show_tokens_elapsed_eta_and_eval_time(tmp_path, token_dir):
    out = tmp_path / "out"
    result = run_script("train.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=8",
                        "--eval_interval=4")
    lines = [line for line in result.stdout.splitlines() if line.startswith("iter ")]
    assert len(lines) == 8
    assert all(re.search(r"\| tokens [\d.]+K? \| elapsed [\dhms.]+ \| ETA ", line) for line in lines)
    assert "ETA ?" in lines[0]  # the first steps (compilation, warm-up) are not timed
    assert re.search(r"ETA \d+\.\ds$", lines[-2]) and lines[-1].endswith("ETA 0.0s")
    assert "tokens 256 |" in lines[0] and "tokens 2.05K |" in lines[-1]  # 8 steps x 256 tokens
    evals = [line for line in result.stdout.splitlines() if line.startswith("eval ")]
    assert len(evals) == 3 and all(re.search(r"\| took \d+\.\ds$", line) for line in evals)
    times = [r["time_s"] for r in records(out, "train")]
    assert times == sorted(times) and times[0] > 0
    assert load_checkpoint(str(out / "last.pt"))["elapsed_s"] >= times[-1]


@pytest.mark.slow
def test_an_injected_spike_is_reported_once(tmp_path, token_dir, monkeypatch, capsys):
    """Steps 14 and 15 report a loss 10x too high (one spike), step 17 a gradient norm 100x too high."""
    calls = []

    def step_with_spikes(*args, **kwargs):
        sums, grad_norm = real_train_step(*args, **kwargs)
        calls.append(1)
        if len(calls) in (15, 16):  # iterations 14 and 15
            sums = sums * torch.tensor([10.0, 1.0])
        if len(calls) == 18:
            grad_norm = grad_norm * 100
        return sums, grad_norm
    real_train_step = train.train_step
    out = tmp_path / "out"
    run_main_in_process([*FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=100",
                         "--condensation_seqs=0", "--log_interval=5"], monkeypatch, train_step=step_with_spikes)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("warning: loss spike at iter 14:") and "> 1.5 x the median" in warnings[0]
    assert warnings[1].startswith("warning: grad_norm spike at iter 17:")
    health = records(out, "health")
    assert [(r["iter"], r["what"]) for r in health] == [(14, "loss"), (17, "grad_norm")]
    assert health[0]["value"] > 1.5 * health[0]["median"]


def run_with_missing_compiler(tmp_path, token_dir, *args):
    """train.py with compile on, as on a machine without a C++ compiler (CXX names none; a fresh kernel cache)."""
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    return subprocess.run([sys.executable, "train.py", *FAST, f"--data_dir={token_dir}", "--max_iters=3",
                           "--eval_interval=100", "--compile=True", "--dispersion_coeff=0.1",
                           "--dispersion_max_tokens=8", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager_loudly_or_stops(tmp_path, token_dir):
    out = tmp_path / "fallback"
    result = run_with_missing_compiler(tmp_path, token_dir, f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stdout.splitlines() if "torch.compile cannot build" in line]
    assert len(warning) == 1 and "InvalidCxxCompiler" in warning[0] and "build-essential" in warning[0]
    assert "WITHOUT torch.compile" in result.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["compile"] is False and "InvalidCxxCompiler" in saved["compile_error"]
    # the probe changed nothing: the same losses as a run that never tried to compile (random dispersion subsets too)
    eager = tmp_path / "eager"
    run_script("train.py", *FAST, f"--data_dir={token_dir}", "--max_iters=3", "--eval_interval=100",
               "--compile=False", "--dispersion_coeff=0.1", "--dispersion_max_tokens=8", f"--out_dir={eager}")
    assert [r["loss"] for r in records(out, "train")] == [r["loss"] for r in records(eager, "train")]

    result = run_with_missing_compiler(tmp_path, token_dir, f"--out_dir={tmp_path / 'stop'}", "--compile_fallback=False")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "torch.compile cannot build its kernels" in result.stderr
    assert not (tmp_path / "stop" / "last.pt").exists()


# --- extending a finished run: WSD and stable.pt

def test_schedule_change_on_resume_is_spelled_out():
    old = load_train_config(["--lr_schedule=wsd", "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=10",
                             "--max_iters=100", "--lr_decay_iters=100", "--wsd_decay_frac=0.2"])
    assert schedule_change(asdict(old), old, 100) is None
    longer = replace(old, max_iters=200, lr_decay_iters=200)
    line = schedule_change(asdict(old), longer, 80)  # from stable.pt (the decay started at 80): no jump
    assert line == ("schedule changed on resume: max_iters 100 -> 200, lr_decay_iters 100 -> 200; "
                    "lr at iter 80: 1.00e-03 (old) -> 1.00e-03 (new)")
    line = schedule_change(asdict(old), longer, 100)  # from the decayed last.pt: the lr jumps back up
    assert "lr at iter 100: 1.00e-04 (old) -> 1.00e-03 (new)" in line and "stable.pt" in line


@pytest.mark.slow
def test_wsd_run_extended_from_stable_pt_equals_a_longer_run(tmp_path, token_dir):
    """Train to 8 steps with a WSD decay over steps 4-7; copy the run, resume it from stable.pt (step 4) to 16
    steps: the lr stays constant until the new decay (steps 8-15), and the run equals one planned for 16 steps."""
    common = [*FAST, f"--data_dir={token_dir}", "--lr_schedule=wsd", "--wsd_decay_frac=0.5", "--warmup_iters=2",
              "--eval_interval=4", "--min_lr=0.0"]
    short, extended, planned = tmp_path / "short", tmp_path / "extended", tmp_path / "planned"
    result = run_script("train.py", *common, "--max_iters=8", "--lr_decay_iters=8", f"--out_dir={short}")
    assert "saved stable.pt at iter 4 (the decay starts)" in result.stdout.replace(str(short) + "/", "")
    assert load_checkpoint(str(short / "stable.pt"))["iter_num"] == 4
    shutil.copytree(short, extended)
    shutil.copyfile(extended / "stable.pt", extended / "last.pt")
    (extended / "best.pt").unlink()  # from the old decay, newer than stable.pt: resume would take it
    result = run_script("train.py", *common, "--max_iters=16", "--lr_decay_iters=16", "--init_from=resume",
                        f"--out_dir={extended}")
    assert ("schedule changed on resume: max_iters 8 -> 16, lr_decay_iters 8 -> 16; "
            "lr at iter 4: 2.00e-03 (old) -> 2.00e-03 (new)") in result.stdout
    run_script("train.py", *common, "--max_iters=16", "--lr_decay_iters=16", f"--out_dir={planned}")
    lrs = [r["lr"] for r in records(extended, "train")]
    assert len(lrs) == 16 and lrs[2:9] == [2e-3] * 7  # constant through the old decay, up to the new one
    assert all(a > b for a, b in zip(lrs[8:], lrs[9:]))  # then the decay, no jump
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "tok_s", "time_s")} for r in rows]
    assert strip(records(extended, "train")) == strip(records(planned, "train"))
    assert records(extended, "eval") == records(planned, "eval")
