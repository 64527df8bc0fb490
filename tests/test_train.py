"""train.py: schedule, data order, and whole runs through the real entry point (learning, checkpoints,
exact resume, clean stops, crash safety)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_script

from smallgpt.checkpoint import load_checkpoint
from smallgpt.config import load_train_config
import train
from smallgpt.errors import DataError
from smallgpt.tokens import TrainWindows, check_token_ids, fixed_windows
from train import get_lr

# a few-second version of config/train_tiny.py
FAST = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_iters=2", "--condensation_seqs=2", "--log_interval=1"]


def metrics(out_dir, kind):
    with open(out_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- units

def test_cosine_schedule():
    cfg = load_train_config(["--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=10", "--lr_decay_iters=110"])
    lrs = [get_lr(it, cfg) for it in range(130)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way: the cosine's midpoint
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110] == lrs[129] == 1e-4


def test_wsd_and_constant_schedules():
    cfg = load_train_config(["--lr_schedule=wsd", "--learning_rate=1e-3", "--min_lr=0.0", "--warmup_iters=10",
                             "--lr_decay_iters=100", "--wsd_decay_frac=0.2"])
    assert get_lr(10, cfg) == get_lr(80, cfg) == 1e-3  # stable phase
    assert get_lr(90, cfg) == pytest.approx(0.5e-3)  # linear decay over the last 20 steps
    assert get_lr(100, cfg) == 0.0
    cfg = load_train_config(["--decay_lr=False", "--warmup_iters=0", "--learning_rate=1e-3"])
    assert get_lr(0, cfg) == get_lr(10**6, cfg) == 1e-3


def test_windows_are_drawn_without_replacement():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = TrainWindows(tokens, block_size=10, seed=3)
    n = windows.per_epoch
    epoch0 = [windows.start(i) for i in range(n)]
    epoch1 = [windows.start(n + i) for i in range(n)]
    assert len(set(epoch0)) == n and len(set(epoch1)) == n  # every window once per epoch
    offset0 = min(epoch0)
    assert sorted(epoch0) == list(range(offset0, offset0 + 10 * n, 10))  # non-overlapping, one shifted grid
    assert epoch0 != epoch1  # a new order (and offset) each epoch
    assert max(epoch0 + epoch1) + 11 <= len(tokens)
    assert epoch0 == [TrainWindows(tokens, 10, 3).start(i) for i in range(n)]  # the seed fixes the order
    x, y = windows.batch(5, 3)
    assert x.shape == (3, 10) and torch.equal(x[:, 1:], y[:, :-1])


def test_validation_windows_are_fixed():
    tokens = np.zeros(10_000, dtype=np.uint16)
    starts = fixed_windows(tokens, 7, 64)
    assert starts == fixed_windows(tokens, 7, 64) and starts[0] == 0 and starts[-1] == 10_000 - 65


@pytest.mark.slow
def test_atomic_save_survives_kill_9(tmp_path):
    """kill -9 in the middle of writing a checkpoint leaves the previous one loadable."""
    path = tmp_path / "last.pt"
    writer = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from smallgpt.checkpoint import save_checkpoint
i = 0
while True:
    save_checkpoint({{"model": {{"w": torch.full((4_000_000,), float(i))}}, "model_args": {{}}, "i": i}}, {str(path)!r})
    i += 1
    print(i, flush=True)
"""
    for delay in (0.5, 0.9, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete checkpoint exists
        time.sleep(delay)
        proc.kill()
        proc.wait()
        ckpt = load_checkpoint(str(path))
        assert torch.all(ckpt["model"]["w"] == ckpt["i"])


# --- whole runs

def test_tiny_config_learns(tmp_path, token_dir):
    """config/train_tiny.py as shipped (shortened): val loss falls far below ln(50304) ~ 10.8 and keeps falling."""
    out = tmp_path / "out"
    result = run_script("train.py", "config/train_tiny.py", f"--data_dir={token_dir}", f"--out_dir={out}",
                        "--max_iters=60", "--eval_interval=20", "--lr_decay_iters=60", "--warmup_iters=10")
    evals = [r["val_loss"] for r in metrics(out, "eval")]
    assert len(evals) == 4 and evals[0] > 10.0
    assert evals[-1] < 7.0 and evals[1] > evals[2] > evals[3]
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    assert "val bpb" in result.stdout and "tok/s" in result.stdout
    last = metrics(out, "eval")[-1]  # the mechanism the multiplier paper is about, at every evaluation
    assert {f"norm/h{i}.{k}" for i in range(4) for k in ("qkv", "attn_out", "fc", "mlp_out")} <= set(last)
    assert {f"resid/rms_l{layer}" for layer in range(5)} <= set(last)
    best = load_checkpoint(str(out / "best.pt"))
    assert best["iter_num"] == 60 and best["best_val_loss"] == min(evals)
    assert best["config"]["max_iters"] == 60 and best["data_position"] == 60 * 8 * 2


def test_best_is_kept_when_val_loss_rises(tmp_path, token_dir):
    """nanoGPT overwrote best_val_loss with the latest; ours keeps the best. A resumed run with an absurd
    learning rate makes the val loss rise: best.pt must stay at the earlier, better step."""
    out = tmp_path / "out"
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=3"]
    run_script("train.py", *common, "--max_iters=6")
    run_script("train.py", *common, "--max_iters=9", "--init_from=resume", "--learning_rate=0.3", "--warmup_iters=0")
    evals = {r["iter"]: r["val_loss"] for r in metrics(out, "eval")}
    assert evals[9] > evals[6], "setup: the loss should rise"
    best = load_checkpoint(str(out / "best.pt"))
    assert best["iter_num"] == 6 and best["best_val_loss"] == evals[6]
    assert load_checkpoint(str(out / "last.pt"))["iter_num"] == 9


def test_resume_is_exact(tmp_path, token_dir):
    """Stopped at step 6 and resumed == uninterrupted: identical losses and bit-identical weights (CPU)."""
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", "--eval_interval=3", "--lr_decay_iters=10",
              "--warmup_iters=2", "--dispersion_coeff=0.1", "--dispersion_max_tokens=16",  # random subsets too
              "--deterministic"]  # bit-exact whatever the load: docs/reproducibility.md
    full, part = tmp_path / "full", tmp_path / "part"
    run_script("train.py", *common, f"--out_dir={full}", "--max_iters=10")
    run_script("train.py", *common, f"--out_dir={part}", "--max_iters=6")
    result = run_script("train.py", *common, f"--out_dir={part}", "--max_iters=10", "--init_from=resume")
    assert "resumed from" in result.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "tok_s", "time_s")} for r in rows]
    assert strip(metrics(full, "train")) == strip(metrics(part, "train"))
    assert [r["iter"] for r in metrics(part, "train")] == list(range(10))  # no duplicates after resume
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(part / "last.pt"))
    assert a["iter_num"] == b["iter_num"] == 10
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, token_dir):
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", "--eval_interval=1000",
              "--lr_decay_iters=20", "--warmup_iters=2", "--deterministic"]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={stopped}", "--max_iters=20"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until a few steps ran
        if line.startswith("iter      3"):
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, output
    k = load_checkpoint(str(stopped / "last.pt"))["iter_num"]
    assert 4 <= k < 20 and "SIGTERM" in output
    run_script("train.py", *common, f"--out_dir={stopped}", "--max_iters=20", "--init_from=resume")
    full = tmp_path / "full"
    run_script("train.py", *common, f"--out_dir={full}", "--max_iters=20")
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(stopped / "last.pt"))
    # bit-exact: one CI run out of several once differed in the last bits here, without deterministic=True
    # (a run's results depend on how many threads its kernels get: docs/reproducibility.md)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_kill_9_during_checkpointing_leaves_a_loadable_checkpoint(tmp_path, token_dir):
    out = tmp_path / "out"
    args = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=1",
            "--max_iters=1000", "--condensation_seqs=0"]  # a checkpoint write after every step
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter      4"):
            break
    proc.kill()
    proc.wait()
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iter_num"] >= 4
    run_script("train.py", *args[:-2], "--max_iters=8", "--init_from=resume")  # and the run continues from it
    assert load_checkpoint(str(out / "last.pt"))["iter_num"] == 8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, token_dir):
    out = tmp_path / "out"
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=100"]
    run_script("train.py", *common, "--max_iters=3")
    before = sha(out / "last.pt")
    result = run_script("train.py", *common, "--max_iters=50", "--init_from=resume", "--learning_rate=1e30",
                        "--warmup_iters=0", "--grad_clip=0", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "stopped without saving" in result.stderr and "last.pt" in result.stderr
    assert sha(out / "last.pt") == before


def test_refuses_to_overwrite_a_run_and_eval_only(tmp_path, token_dir):
    out = tmp_path / "out"
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}"]
    run_script("train.py", *common, "--max_iters=2")
    result = run_script("train.py", *common, "--max_iters=2", check=False)
    assert result.returncode != 0 and "already holds checkpoints" in result.stderr
    written = {name: sha(out / name) for name in ("metrics.jsonl", "config.json", "last.pt", "best.pt")}
    last_eval = metrics(out, "eval")[-1]
    for source in ("--init_from=resume", f"--init_from={out}"):
        result = run_script("train.py", *common, source, "--eval_only")
        assert f"val loss {last_eval['val_loss']:.4f}" in result.stdout  # the trained model, not a fresh one
        assert {name: sha(out / name) for name in written} == written  # and nothing in out_dir touched
    result = run_script("train.py", *common, "--eval_only", check=False)
    assert result.returncode == 1 and "eval_only evaluates a trained model" in result.stderr


def run_main_in_process(args, monkeypatch, **patches):
    """train.main in this process (to patch its helpers), restoring the signal handlers it installs."""
    monkeypatch.chdir(REPO)
    for name, value in patches.items():
        monkeypatch.setattr(train, name, value)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.main(args)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_stop_before_an_evaluation_is_evaluated_on_resume(tmp_path, token_dir, monkeypatch):
    """Ctrl-C in the step that leads to an evaluation: the run saves without evaluating, and the resumed run
    evaluates that iteration (metrics.jsonl, best.pt), with the same result as an uninterrupted run."""
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", "--eval_interval=4", "--max_iters=6"]
    steps = []

    def step_with_ctrl_c(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:  # the step from iter 3 to iter 4
            os.kill(os.getpid(), signal.SIGINT)
        return real_train_step(*args, **kwargs)
    real_train_step = train.train_step
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    run_main_in_process([*common, f"--out_dir={stopped}"], monkeypatch, train_step=step_with_ctrl_c)
    ckpt = load_checkpoint(str(stopped / "last.pt"))
    assert ckpt["iter_num"] == 4 and ckpt["evaluated"] is False
    assert [r["iter"] for r in metrics(stopped, "eval")] == [0]
    run_script("train.py", *common, f"--out_dir={stopped}", "--init_from=resume")
    run_script("train.py", *common, f"--out_dir={full}")
    assert [r["iter"] for r in metrics(stopped, "eval")] == [0, 4, 6]
    assert metrics(stopped, "eval") == metrics(full, "eval")
    assert load_checkpoint(str(stopped / "best.pt"))["iter_num"] == load_checkpoint(str(full / "best.pt"))["iter_num"]


def test_stop_during_an_evaluation_saves_without_another_step(tmp_path, token_dir, monkeypatch):
    """Ctrl-C while evaluating (one process): last.pt is saved right after the evaluation, and the resumed run
    does not evaluate that iteration again."""
    out = tmp_path / "out"
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=4",
              "--max_iters=6"]
    evals = []

    def condensation_with_ctrl_c(*args, **kwargs):
        evals.append(1)
        if len(evals) == 2:  # the evaluation at iter 4
            os.kill(os.getpid(), signal.SIGINT)
        return real_condensation(*args, **kwargs)
    real_condensation = train.condensation_metrics
    run_main_in_process(common, monkeypatch, condensation_metrics=condensation_with_ctrl_c)
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iter_num"] == 4 and ckpt["evaluated"] is True
    result = run_script("train.py", *common, "--init_from=resume")
    assert "eval 4:" not in result.stdout
    assert [r["iter"] for r in metrics(out, "eval")] == [0, 4, 6]


def test_metrics_line_cut_by_a_kill_does_not_block_resume(tmp_path, token_dir):
    out = tmp_path / "out"
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=2"]
    run_script("train.py", *common, "--max_iters=2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 2, "lo')  # what kill -9 mid-write leaves
    run_script("train.py", *common, "--max_iters=4", "--init_from=resume")
    assert [r["iter"] for r in metrics(out, "train")] == [0, 1, 2, 3]


def test_init_from_a_checkpoint_takes_its_architecture(tmp_path, token_dir):
    """A new run from another run's checkpoint uses that checkpoint's architecture and says so (config.json too)."""
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", "--max_iters=2"]
    run_script("train.py", *common, f"--out_dir={tmp_path / 'a'}")
    result = run_script("train.py", *common, f"--out_dir={tmp_path / 'b'}", f"--init_from={tmp_path / 'a'}",
                        "--n_layer=3", "--block_size=48")
    assert "architecture of" in result.stdout and "n_layer=2 (config had 3)" in result.stdout
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["n_layer"] == 2 and saved["block_size"] == 32


@pytest.mark.parametrize("content, message", [
    ("{not json", "is unreadable"), ("[]", "is not written by prepare.py"),
    ('{"format": "gpt-tokens", "version": 1, "vocab_size": 50257, "splits": {"train": {"tokens": 5, "bytes": 9}}}',
     "lacks the field 'val'"),
])
def test_damaged_meta_json_is_one_clear_error(tmp_path, content, message):
    from smallgpt.errors import DataError
    from smallgpt.shards import read_meta
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(DataError, match=message):
        read_meta(tmp_path)


@pytest.mark.slow
def test_token_ids_outside_the_vocabulary_are_one_clear_error(tmp_path, token_dir):
    """A corrupt train or val shard (ids >= vocab_size): train.py names the file and the first bad position of
    the batch that holds it, before any model sees it (val at the first evaluation, train at the first step)."""
    import shutil
    for split, positions in (("val", [5, 9]), ("train", range(1000, 1_400_000, 31))):  # hits every train window
        data = tmp_path / split
        shutil.copytree(token_dir, data)
        tokens = np.memmap(data / f"{split}_000000.bin", dtype=np.uint16, mode="r+")
        tokens[list(positions)] = 60000
        tokens.flush()
        result = run_script("train.py", "config/train_tiny.py", *FAST, f"--data_dir={data}",
                            f"--out_dir={tmp_path / ('out_' + split)}", "--max_iters=2", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and line.startswith(f"train.py: error: {data / split}_000000.bin: token id 60000 at position ")
        position = int(line.split(" at position ")[1].split()[0].replace(",", ""))
        assert position in positions and (split == "train" or position == 5)
        assert "outside the vocabulary (vocab_size 50267)" in line
        assert ("eval 0: val loss" in result.stdout) == (split == "train")  # val was clean: evaluated first


def test_check_token_ids_reports_the_first_bad_position():
    tokens = np.arange(100) % 50
    tokens[[70, 20, 25]] = 99
    rows = np.stack([tokens[s:s + 9] for s in (65, 15, 40)])
    with pytest.raises(DataError, match="token id 99 at position 20 is outside the vocabulary"):
        check_token_ids(rows, tokens, [65, 15, 40], vocab_size=50)
    check_token_ids(rows, tokens, [65, 15, 40], vocab_size=100)  # all below: no error


def test_resume_from_a_checkpoint_of_another_program(tmp_path, token_dir):
    """A nanoGPT ckpt.pt renamed last.pt has no optimizer/scaler/rng state to resume: one line says what to do."""
    out = tmp_path / "out"
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}"]
    run_script("train.py", *common, "--max_iters=1")
    ckpt = load_checkpoint(str(out / "last.pt"))
    torch.save({k: ckpt[k] for k in ("model", "model_args", "iter_num", "best_val_loss", "config")}, out / "last.pt")
    result = run_script("train.py", *common, "--max_iters=2", "--init_from=resume", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "was not written by this train.py (no optimizer, scaler, data_position, rng)" in result.stderr


# --- issue: fault campaign (dead end, finished runs, atomic metrics) and provenance

@pytest.mark.slow
def test_kill_after_the_first_best_pt_can_resume(tmp_path, token_dir):
    """The old dead end: killed after the first best.pt and before any last.pt (always_save_checkpoint=False
    writes last.pt only at the end). A new run refuses the directory and names the way out; resume takes best.pt,
    which holds the full training state, and continues."""
    out = tmp_path / "out"
    args = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=2",
            "--always_save_checkpoint=False", "--condensation_seqs=0"]
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--max_iters=1000"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("eval 4:"):  # best.pt of iter 2 exists; the evaluation of iter 4 just ran
            break
    proc.kill()
    proc.wait()
    assert (out / "best.pt").exists() and not (out / "last.pt").exists()
    result = run_script("train.py", *args, "--max_iters=8", check=False)
    assert result.returncode == 1 and "--init_from=resume" in result.stderr and "best.pt" in result.stderr
    result = run_script("train.py", *args, "--max_iters=8", "--init_from=resume")
    assert "resumed from" in result.stdout and "best.pt" in result.stdout
    assert load_checkpoint(str(out / "last.pt"))["iter_num"] == 8


def test_best_pt_is_written_before_last_pt(tmp_path, token_dir, monkeypatch):
    """No file may record a val loss before best.pt holds its weights (test_train_faults.py kills between them)."""
    written = []
    monkeypatch.setattr(train, "save_checkpoint", lambda obj, path: written.append(os.path.basename(path)))
    run_main_in_process(["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={tmp_path / 'o'}",
                         "--eval_interval=2", "--max_iters=4", "--condensation_seqs=0"], monkeypatch)
    assert written == ["best.pt", "last.pt", "best.pt", "last.pt"]


def test_resuming_a_finished_run_changes_nothing(tmp_path, token_dir):
    """Job schedulers restart finished jobs: the run says it is finished and leaves every file as it was."""
    out = tmp_path / "out"
    common = ["config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=3"]
    run_script("train.py", *common)
    files = {name: sha(out / name) for name in ("metrics.jsonl", "config.json", "last.pt", "best.pt")}
    for _ in range(2):
        result = run_script("train.py", *common, "--init_from=resume")
        assert "already reached max_iters 3" in result.stdout
    assert {name: sha(out / name) for name in files} == files
    assert [r["iter"] for r in metrics(out, "eval")] == [0, 3]


def test_metrics_trim_on_resume_is_atomic(tmp_path, monkeypatch):
    """A kill while the trimmed metrics.jsonl is written leaves the old file whole."""
    records = [{"type": "train", "iter": i, "loss": 1.0} for i in range(5)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.os, "replace", killed)
    cfg = load_train_config([f"--out_dir={tmp_path}"])
    with pytest.raises(KeyboardInterrupt):
        train.MetricsLog(cfg, resume_iter=2)
    assert path.read_text() == before
    monkeypatch.undo()
    train.MetricsLog(cfg, resume_iter=2)
    assert [json.loads(line)["iter"] for line in path.read_text().splitlines()] == [0, 1]


def test_code_version_is_recorded(tmp_path, token_dir):
    from smallgpt.checkpoint import code_version
    out = tmp_path / "out"
    result = run_script("train.py", "config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}",
                        "--max_iters=1")
    version = code_version()
    assert version != "unknown" and len(version.split()[0]) >= 7  # the tests run in a git checkout
    assert f"code {version}" in result.stdout
    assert json.loads((out / "config.json").read_text())["code_version"] == version
    assert load_checkpoint(str(out / "last.pt"))["code_version"] == version
