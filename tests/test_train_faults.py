"""train.py under faults, through its real entry point: kill -9 at exact moments of the checkpoint writes (a soak
over all of them), a full disk, a second trainer in the same out_dir, a killed sweep, a damaged metrics.jsonl; and
what the console says at start and at the end."""
import errno
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, hooked_train, run_script

import train
from smallgpt.checkpoint import load_checkpoint, model_from_checkpoint
from smallgpt.config import load_train_config, with_vocab_size
from smallgpt.errors import DataError
from smallgpt.metrics import read_records
from smallgpt.shards import open_split
from smallgpt.tokenizer import open_tokenizer

# a few-second version of config/train_tiny.py (as test_train.py's), no condensation diagnostic
FAST = ["config/train_tiny.py", "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_iters=2", "--condensation_seqs=0", "--log_interval=1"]

def eval_losses(out):
    return {r["iter"]: r["val_loss"] for r in read_records(out) if r["type"] == "eval"}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def val_loss_of(path, args):
    """The val loss of a checkpoint's weights, computed here with train.py's own evaluation (fixed windows)."""
    cfg = load_train_config([*args, "--device=cpu"])
    rt = train.Runtime(ddp=False, rank=0, local_rank=0, world=1, device="cpu", dtype="float32", accum=1)
    tokens, meta = open_split(cfg.data_dir, "val")
    cfg = with_vocab_size(cfg, meta["vocab_size"])  # as train.py resolves it
    model = model_from_checkpoint(load_checkpoint(str(path)))
    evaluate = train.Evaluator(cfg, tokens, meta["vocab_size"], rt, open_tokenizer(cfg.data_dir).record)
    return evaluate(model, model, 0)["val_loss"]


def assert_best_pt_holds_the_best(out, reference, args):
    """The invariant: best.pt holds the weights of the best evaluation recorded anywhere (its own record, last.pt's,
    and, the run being deterministic, the uninterrupted reference run's evaluations up to the newest checkpoint)."""
    files = {name: load_checkpoint(str(out / name)) for name in ("best.pt", "last.pt") if (out / name).exists()}
    if "best.pt" not in files:
        assert not files, "last.pt without best.pt"
        return
    best = files["best.pt"]
    newest = max(c["iter_num"] for c in files.values())
    trained = {it: v for it, v in reference.items() if 1 <= it <= newest}  # iter 0 (untrained) is never saved
    assert best["best_val_loss"] == min(c["best_val_loss"] for c in files.values()) == min(trained.values())
    assert reference[best["iter_num"]] == best["best_val_loss"], "best.pt's record is not its own evaluation"
    assert val_loss_of(out / "best.pt", args) == pytest.approx(best["best_val_loss"], abs=1e-5), "other weights"


# --- issue 26 item 1: the best weights survive a kill at any moment of the checkpoint writes

@pytest.mark.slow
def test_kill_9_soak_over_checkpoint_writes_keeps_the_best_weights(tmp_path, token_dir):
    """always_save_checkpoint=False (best.pt whenever val loss improves, last.pt at the end), an evaluation at every
    step. Every start is killed -9 at its 1st, 2nd or 3rd checkpoint moment in turn (inside a write, right after
    one, inside the next), until a start finishes. After every kill best.pt holds the best weights recorded
    anywhere, and the finished run equals the uninterrupted one (same evaluations, bit-identical best.pt)."""
    args = [*FAST, f"--data_dir={token_dir}", "--eval_interval=1", "--always_save_checkpoint=False",
            "--max_iters=8", "--warmup_iters=2", "--lr_decay_iters=8", "--deterministic"]
    ref, out = tmp_path / "reference", tmp_path / "soak"
    run_script("train.py", *args, f"--out_dir={ref}")
    reference = eval_losses(ref)
    kills = 0
    for kill_at in itertools.cycle([2, 1, 3]):
        resume = ["--init_from=resume"] if (out / "best.pt").exists() or (out / "last.pt").exists() else []
        result = hooked_train(*args, f"--out_dir={out}", *resume, KILL_AT=kill_at)
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        kills += 1
        assert kills < 40, "the soak makes no progress"
        assert_best_pt_holds_the_best(out, reference, [*args, f"--out_dir={out}"])
    assert kills >= 8  # every write was hit
    assert eval_losses(out) == reference
    a, b = load_checkpoint(str(ref / "best.pt")), load_checkpoint(str(out / "best.pt"))
    assert a["iter_num"] == b["iter_num"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert load_checkpoint(str(out / "last.pt"))["iter_num"] == 8
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_kill_between_the_final_writes_finishes_the_run(tmp_path, token_dir):
    """Killed right after the final best.pt, before the final last.pt: the restart does not say 'nothing to do'
    with an old last.pt, it writes last.pt at max_iters (and best.pt stays the best)."""
    args = [*FAST, f"--data_dir={token_dir}", "--eval_interval=2", "--max_iters=4"]
    moments = hooked_train(*args, f"--out_dir={tmp_path / 'count'}").stderr.splitlines()  # no kill: count them
    moment = [int(m.split()[1].rstrip(":")) for m in moments if m.endswith("saved best.pt")][-1]
    assert moments[moment + 1].endswith("saved last.pt") and len(moments) == moment + 2  # the final pair
    out = tmp_path / "out"
    args.append(f"--out_dir={out}")
    assert hooked_train(*args, KILL_AT=moment).returncode == -signal.SIGKILL
    assert load_checkpoint(str(out / "best.pt"))["iter_num"] == 4 > load_checkpoint(str(out / "last.pt"))["iter_num"]
    result = run_script("train.py", *args, "--init_from=resume")
    assert "writing last.pt" in result.stdout and "Nothing to do" not in result.stdout
    assert load_checkpoint(str(out / "last.pt"))["iter_num"] == 4
    assert "already reached max_iters" in run_script("train.py", *args, "--init_from=resume").stdout


# --- issue 26 item 3: a full disk, and the temporaries of killed runs

@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoints(tmp_path, token_dir):
    out = tmp_path / "out"
    args = [*FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=2", "--max_iters=6"]
    result = hooked_train(*args, FULL_AFTER=2)  # iter 2's best.pt and last.pt fit; iter 4's best.pt does not
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    name = "best.pt" if "best.pt" in line else "last.pt"  # best.pt when iter 4 improved (it does), else last.pt
    assert line.startswith(f"train.py: error: cannot write {out / name}: no space left on the device (it needs "
                           f"about "), line
    assert "MB, " in line and line.endswith(f" free); the previous {name} is untouched")
    assert not list(out.glob("*.tmp"))  # the partial temporary is gone: it would keep the disk full
    assert load_checkpoint(str(out / "best.pt"))["iter_num"] == load_checkpoint(str(out / "last.pt"))["iter_num"] == 2
    run_script("train.py", *args, "--init_from=resume")  # space freed: the run goes on from the previous state
    assert load_checkpoint(str(out / "last.pt"))["iter_num"] == 6


def test_a_failed_write_removes_its_temporary(tmp_path, monkeypatch):
    from smallgpt import checkpoint
    (tmp_path / "last.pt").write_bytes(b"previous")

    def full(obj, f):
        f.write(b"x" * 1000)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from OSError(
            errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(DataError, match=r"last.pt: no space left on the device \(it needs about 4 KB, .* free\); "
                                        r"the previous last.pt is untouched"):
        checkpoint.save_checkpoint({"w": torch.zeros(1000)}, str(tmp_path / "last.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"] and (tmp_path / "last.pt").read_bytes() == b"previous"

    def bug(obj, f):
        raise ValueError("a bug")
    monkeypatch.setattr(checkpoint.torch, "save", bug)
    with pytest.raises(ValueError, match="a bug"):  # not a full disk: the error as it is, the temporary removed
        checkpoint.save_checkpoint({}, str(tmp_path / "best.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, token_dir):
    out = tmp_path / "out"
    args = [*FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=2"]
    run_script("train.py", *args, "--max_iters=2")
    (out / "last.pt.tmp").write_bytes(b"\0" * 3_000_000)  # what kill -9 inside a write leaves
    (out / "stable.pt.tmp").write_bytes(b"\0" * 1000)
    result = run_script("train.py", *args, "--max_iters=4", "--init_from=resume")
    assert "removed last.pt.tmp, stable.pt.tmp (3 MB): the unfinished checkpoint write of a run that was killed" \
        in result.stdout
    assert not list(out.glob("*.tmp"))


# --- issue 26 item 5: one trainer per out_dir; a killed sweep ends its trainer

def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def process_ended(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has ended, only not been reaped
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_a_second_trainer_in_the_same_out_dir_stops_at_once(tmp_path, token_dir):
    out = tmp_path / "out"
    args = [*FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=2"]
    first = subprocess.Popen([sys.executable, "train.py", *args, "--max_iters=100000"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "last.pt").exists(), "the first trainer's checkpoint")
        result = run_script("train.py", *args, "--max_iters=4", "--init_from=resume", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (f"train.py: error: {out} is in use by another train.py (pid {first.pid} on "
                                         f"{os.uname().nodename}); two runs writing one out_dir would overwrite each "
                                         f"other's checkpoints: wait for it, stop it, or choose another out_dir")
    finally:
        first.kill()
        first.wait()
    run_script("train.py", *args, "--max_iters=4", "--init_from=resume")  # the lock died with the killed trainer


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_a_sweep_ends_its_trainer(tmp_path, token_dir):
    out = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "ablate.py", "--base=config/train_tiny.py", "--seeds=1",
                              f"--out_dir={out}", f"--data_dir={token_dir}",
                              "--train_args=" + " ".join(FAST[1:] + ["--max_iters=100000", "--eval_interval=1000"])],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = out / "baseline-s1"
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and '"train"' in (run / "metrics.jsonl").read_text(),
                 "the trainer's first step")
        trainer = int(open(f"/proc/{sweep.pid}/task/{sweep.pid}/children").read().split()[0])  # train.py
    finally:
        sweep.kill()
        sweep.wait()
    wait_for(lambda: process_ended(trainer), "the trainer to end with its sweep", timeout=60)
    assert load_checkpoint(str(run / "last.pt"))["iter_num"] >= 1  # SIGTERM: it saved before ending


# --- issue 26 item 6: a damaged metrics.jsonl

def test_a_non_utf8_line_is_named_or_left_out(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [{"type": "train", "iter": 0, "loss": 10.0}, {"type": "eval", "iter": 1, "val_loss": 9.0}]
    path.write_bytes(json.dumps(good[0]).encode() + b"\n\xff\xfe garbage\n" + json.dumps(good[1]).encode() + b"\n")
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 is not UTF-8 text"):  # plot.py: one line, no crash
        read_records(tmp_path)
    assert read_records(tmp_path, skip_damaged=True) == good
    assert "1 damaged line(s) left out (line 2 is not UTF-8 text)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_non_utf8_byte_in_metrics_does_not_block_resume(tmp_path, token_dir):
    out = tmp_path / "out"
    args = [*FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=2"]
    run_script("train.py", *args, "--max_iters=2")
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (out / "metrics.jsonl").write_bytes(b"".join(lines[:1] + [b'{"type": "train", "iter": 1\xff}\n'] + lines[1:]))
    result = run_script("train.py", *args, "--max_iters=4", "--init_from=resume")
    assert "metrics.jsonl: 1 damaged line(s) left out (line 2 is not UTF-8 text)" in result.stderr
    records = read_records(out)  # the damaged line is gone, the rest of the curve kept
    assert [r["iter"] for r in records if r["type"] == "train"] == [0, 1, 2, 3]


# --- issue 25 item 6: the console

@pytest.mark.slow
def test_console_shows_changed_keys_best_pt_and_a_summary(tmp_path, token_dir):
    out = tmp_path / "out"
    result = run_script("train.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--eval_interval=2",
                        "--max_iters=4")
    lines = result.stdout.splitlines()
    config = next(line for line in lines if line.startswith("config"))
    assert config.startswith(f"config (keys that differ from the defaults; all keys: {out}/config.json): ")
    assert "n_layer=2" in config and "max_iters=4" in config and "learning_rate=0.002" in config  # train_tiny's
    assert "wandb_project" not in config and "beta1" not in config  # the defaults stay in config.json
    assert len(config.replace(str(out), "").replace(str(token_dir), "")) < 400  # the old line had 1,900 characters
    evals = eval_losses(out)
    best_iter = min((it for it in evals if it > 0), key=evals.get)
    assert f"saved {out}/best.pt: val loss {evals[best_iter]:.4f}, the best so far" in lines
    done, files, sample = lines[-3:]
    assert done.startswith("done at iter 4: 1.02K tokens in ")
    assert done.endswith(f"best val loss {evals[best_iter]:.4f} at iter {best_iter} (best.pt)")
    size = lambda name: (out / name).stat().st_size
    assert files.startswith(f"files in {out}: best.pt ") and all(f"{n} " in files for n in ("last.pt", "metrics.jsonl"))
    assert f"best.pt {size('best.pt') / 1e6:.3g} MB" in files
    assert sample == f"sample from it: python sample.py --out_dir={out}"
    result = run_script(*sample.split(": ", 1)[1].split()[1:], "--max_new_tokens=3", "--device=cpu")
    assert "3 tokens in" in result.stderr
