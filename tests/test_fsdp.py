"""parallel=fsdp (smallgpt/parallel.py): train.py under torchrun with the model sharded over 2 CPU processes (gloo)
computes what one process computes; its sharded checkpoints resume under 1 and 2 processes (and a one-process FSDP
checkpoint under 2), survive a SIGKILL in the middle of a save, and become the single file that sample.py,
export.py and eval.py read; bad set-ups are one line.

Tolerance. In general bitwise equality is not expected, for three reasons, each a last-bit (~1e-7 relative)
difference per step: the gradients of the micro-batches are summed in another order (one process adds 4
micro-batches in one buffer; FSDP adds 2 per rank, then reduce-scatters their mean); FSDP's backward hooks change
the order in which autograd sums the two uses of a block's output that the dispersion loss makes; and the global
gradient norm is summed over the shards in another order (3e-6 relative on this model's 3.2M-element embedding),
which an active gradient clipping passes on to every gradient. AdamW carries them to the weights as such: over 8
steps of test_ddp.py's run (dispersion on, clipping active) the losses agree to ~1e-7 relative and the weights to
6e-6, so the tolerances are test_ddp.py's: losses rel 1e-5, weights rtol 1e-4 + atol 1e-5, far below what one
wrong step (lr 2e-3) would move. Muon's bfloat16 Newton-Schulz turns such bits into rounding flips (weights ~4e-4
apart after 8 steps, with clipping active), so its run avoids all three (one micro-batch per rank, no dispersion,
grad_clip=0, one thread per process), where FSDP's arithmetic is one process's: it must then match bit for bit.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_script
from test_ddp import ARGS, evals, losses

from smallgpt.checkpoint import SHARDED_DIR, find_checkpoint, load_checkpoint
from smallgpt.config import load_train_config, model_args, with_vocab_size
from smallgpt.errors import DataError
from smallgpt.optim import split_parameters
from smallgpt.parallel import consolidate, full_parameters, read_sharded, unused_name
from model import GPT, GPTConfig

# test_ddp.py's run (both research features, HellaSwag split 3 + 2 over the ranks), 8 steps, checkpoints at 4 and 8
FSDP = [*ARGS, "--eval_interval=4", "--hellaswag_interval=4", "--lr_decay_iters=8"]
# the modern block with grouped-query attention (2 query heads per key/value head) and Muon, where FSDP's sums are
# one process's (the docstring): one micro-batch per rank, no dispersion loss, no clipping, one thread per process
MODERN = ["config/train_tiny.py", "--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--block_size=32",
          "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--eval_interval=4",
          "--condensation_seqs=2", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=8", "--max_iters=8",
          "--pos_emb=rope", "--norm=rmsnorm", "--qk_norm=True", "--mlp=swiglu", "--multipliers=vector",
          "--optimizer=muon", "--muon_momentum_warmup=8", "--grad_clip=0", "--deterministic"]


def torchrun(*args, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           "--parallel=fsdp", *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result


def assert_same_run(a_dir, b_dir, weights="last.pt"):
    """Same losses, val losses and final weights (the tolerances of the module docstring)."""
    (train_a, val_a), (train_b, val_b) = losses(a_dir), losses(b_dir)
    assert len(train_a) == len(train_b) and train_a == pytest.approx(train_b, rel=1e-5)
    assert val_a == pytest.approx(val_b, rel=1e-5)
    a, b = load_checkpoint(str(a_dir / weights)), load_checkpoint(str(b_dir / weights))
    assert a["iter_num"] == b["iter_num"] and a["data_position"] == b["data_position"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)


def resume_copy(src, dst):
    """A copy of a run directory with only its sharded checkpoints (the single files at the same iteration would
    be preferred by a one-process resume)."""
    shutil.copytree(src, dst)
    for name in ("last.pt", "best.pt"):
        (dst / name).unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def single(tmp_path_factory, token_dir):
    out = tmp_path_factory.mktemp("single")
    run_script("train.py", *FSDP, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=8")
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, token_dir):
    """FSDP x 2, 0 -> 8 (the uninterrupted run) and 0 -> 4 (the checkpoint the resumes start from)."""
    full, half = tmp_path_factory.mktemp("fsdp_full"), tmp_path_factory.mktemp("fsdp_half")
    result = torchrun(*FSDP, f"--data_dir={token_dir}", f"--out_dir={full}", "--max_iters=8")
    assert "2 process(es) (FSDP" in result.stdout and "2 micro-batches per process" in result.stdout
    torchrun(*FSDP, f"--data_dir={token_dir}", f"--out_dir={half}", "--max_iters=4")
    return full, half


# -----------------------------------------------------------------------------
# 2 processes == 1 process

@pytest.mark.slow
def test_fsdp_matches_one_process(single, sharded):
    full, _ = sharded
    assert_same_run(single, full)
    for key in ("val_bpb", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_items"):  # split unevenly over ranks
        assert evals(full, key) == pytest.approx(evals(single, key), rel=1e-5) and len(evals(full, key)) == 3
    with open(full / "metrics.jsonl") as f:  # the multiplier statistics need the whole weights: gathered
        assert '"mult/h1.qk_ratio"' in f.read()
    # sharded checkpoints while training, and at the end the single files of the usual kind
    assert sorted(os.listdir(full / SHARDED_DIR)) == ["best", "iter-000008", "last"]
    files = set(os.listdir(full / SHARDED_DIR / "iter-000008"))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"} <= files
    assert load_checkpoint(str(full / "best.pt"))["iter_num"] == 8


@pytest.mark.slow
def test_reduce_scatter_after_every_micro_batch_is_the_same_run(tmp_path, token_dir, single):
    """fsdp_sync_every_micro_batch (the 1.2B config's): the gradients of each micro-batch are reduce-scattered and
    summed as shards, not whole: the same run within the tolerances (measured: losses 2e-7, weights 6e-6)."""
    out = tmp_path / "every"
    torchrun(*FSDP, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=8",
             "--fsdp_sync_every_micro_batch=True")
    assert_same_run(single, out)


@pytest.mark.slow
def test_bfloat16_gathers_bf16_weights_and_reduces_in_float32(tmp_path, token_dir):
    """dtype=bfloat16: FSDP's MixedPrecisionPolicy (bf16 weights gathered, float32 gradient reduction, float32
    master weights) against one process's bf16 autocast. Not the same arithmetic: under the policy the residual
    stream between blocks is bf16 too (docs/training.md). Measured over 8 steps: losses 7e-5 relative apart,
    weights 8e-3; allowed: 5e-4 relative for the losses (a wrong gradient reduction is a wrong step: percents)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train.py", *FSDP, f"--data_dir={token_dir}", f"--out_dir={one}", "--max_iters=8", "--dtype=bfloat16")
    result = torchrun(*FSDP, f"--data_dir={token_dir}", f"--out_dir={two}", "--max_iters=8", "--dtype=bfloat16")
    assert "dtype bfloat16, 2 process(es) (FSDP" in result.stdout
    (train_one, val_one), (train_two, val_two) = losses(one), losses(two)
    assert len(train_two) == 8 and train_two == pytest.approx(train_one, rel=5e-4)
    assert val_two == pytest.approx(val_one, rel=5e-4)
    master = load_checkpoint(str(two / "last.pt"))["model"]
    assert all(t.dtype == torch.float32 for t in master.values())  # the master weights stay float32


@pytest.mark.slow
def test_modern_block_gqa_and_muon_match_one_process_and_export(tmp_path, token_dir):
    """Muon's Newton-Schulz on the whole matrices (FSDPMuon), the modern block, grouped-query attention; then the
    single-file checkpoint exports to a Llama with fewer key/value heads than query heads, logits checked."""
    pytest.importorskip("transformers")
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train.py", *MODERN, f"--data_dir={token_dir}", f"--out_dir={one}")
    torchrun(*MODERN, f"--data_dir={token_dir}", f"--out_dir={two}")
    assert losses(one) == losses(two) and len(losses(one)[0]) == 8
    a, b = load_checkpoint(str(one / "last.pt")), load_checkpoint(str(two / "last.pt"))
    assert a["optimizer"]["steps"] == b["optimizer"]["steps"] == 8  # Muon's momentum warm-up went on
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in ("muon", "adamw"):  # the optimizer state too: momentum and Adam's moments, gathered from the shards
        for sa, sb in zip(a["optimizer"][name]["state"].values(), b["optimizer"][name]["state"].values(), strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    result = run_script("export.py", f"--model={two}", f"--out={tmp_path / 'hf'}")
    assert "check: transformers reproduces" in result.stdout
    config = (tmp_path / "hf" / "config.json").read_text()
    assert '"num_key_value_heads": 2' in config and '"num_attention_heads": 4' in config


# -----------------------------------------------------------------------------
# Sharded checkpoints: other numbers of processes, a kill during a save, the single file

@pytest.mark.slow
def test_sharded_checkpoint_resumes_under_one_process(tmp_path, token_dir, single, sharded):
    _, half = sharded
    out = resume_copy(half, tmp_path / "one")
    result = run_script("train.py", *FSDP, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=8",
                        "--init_from=resume")
    assert f"resumed from {out / SHARDED_DIR / 'iter-000004'} at iter 4" in result.stdout
    assert_same_run(single, out)


def kill_during_save(args, out):
    """Start an FSDP run and SIGKILL all its processes while its first sharded save is under way (save.tmp exists,
    not yet renamed). Returns False if the save finished before the kill landed (then nothing was tested)."""
    tmp = out / SHARDED_DIR / "save.tmp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--parallel=fsdp", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not tmp.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return tmp.exists()


@pytest.mark.slow
def test_sigkill_during_a_sharded_save_leaves_a_resumable_run(tmp_path, token_dir, sharded):
    full, half = sharded
    args = [*FSDP, f"--data_dir={token_dir}", "--max_iters=8", "--init_from=resume"]
    for attempt in range(3):  # the save of these tiny models takes a fraction of a second
        out = resume_copy(half, tmp_path / f"killed{attempt}")
        if kill_during_save([*args, f"--out_dir={out}"], out):
            break
    else:
        pytest.skip("each save finished before the kill landed")
    assert read_sharded(str(out))["iter_num"] == 4  # 'last' still names the complete checkpoint of iter 4
    torchrun(*args, f"--out_dir={out}")  # and the run goes on from it
    assert not (out / SHARDED_DIR / "save.tmp").exists()  # the killed save's leftovers are gone
    assert_same_run(full, out)


@pytest.mark.slow
def test_one_process_fsdp_checkpoint_resumes_under_two(tmp_path, token_dir, sharded):
    full, _ = sharded
    out = tmp_path / "one_to_two"
    torchrun(*FSDP, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=4", nproc=1)
    resume_copy(out, tmp_path / "copy")
    result = torchrun(*FSDP, f"--data_dir={token_dir}", f"--out_dir={tmp_path / 'copy'}", "--max_iters=8",
                      "--init_from=resume")
    assert "resumed from" in result.stdout and "iter-000004" in result.stdout
    assert_same_run(full, tmp_path / "copy")


@pytest.mark.slow
def test_single_file_from_a_sharded_checkpoint_samples_and_evaluates(tmp_path, token_dir, sharded):
    _, half = sharded
    out = resume_copy(half, tmp_path / "run")
    with pytest.raises(DataError, match="only sharded ones: make one with python consolidate.py"):
        find_checkpoint(str(out))
    result = run_script("consolidate.py", f"--out_dir={out}")
    assert f"wrote {out / 'last.pt'}" in result.stdout
    ckpt, reference = load_checkpoint(str(out / "last.pt")), load_checkpoint(str(half / "last.pt"))
    assert ckpt["iter_num"] == 4 and ckpt.keys() == reference.keys()  # the usual kind (train.py made half's)
    for key in reference["model"]:
        assert torch.equal(ckpt["model"][key], reference["model"][key]), key
    sample = run_script("sample.py", f"--out_dir={out}", "--which=last", "--max_new_tokens=5", "--start=The")
    assert sample.stdout.startswith("The")
    result = run_script("eval.py", f"--model={out / 'last.pt'}", f"--data_dir={token_dir}", "--hellaswag_items=0",
                        "--log_metrics=False", "--batch_size=32")
    val_loss = float(re.search(r"\| val +\| loss +\| ([\d.]+)", result.stdout).group(1))
    assert 9 < val_loss < evals(half, "val_loss")[0]  # trained 4 steps: below the untrained model's


# -----------------------------------------------------------------------------
# One-line mistakes

@pytest.mark.slow
def test_fsdp_without_torchrun_is_one_line(tmp_path):
    result = run_script("train.py", "config/train_tiny.py", "--parallel=fsdp", f"--out_dir={tmp_path}", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "parallel=fsdp shards the model over the processes that torchrun starts" in result.stderr


@pytest.mark.slow
def test_resuming_a_sharded_checkpoint_with_another_shape_is_one_line(tmp_path, token_dir, sharded):
    _, half = sharded
    out = resume_copy(half, tmp_path / "run")
    result = run_script("train.py", *FSDP, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=8",
                        "--init_from=resume", "--n_embd=32", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "cannot resume with a different architecture: n_embd (config 32, checkpoint 64)" in result.stderr


# -----------------------------------------------------------------------------
# Units

def test_saves_of_the_same_iteration_get_their_own_directory(tmp_path):
    (tmp_path / "iter-000004").mkdir()
    (tmp_path / "iter-000004-2").mkdir()
    assert unused_name(str(tmp_path), "iter-000004") == "iter-000004-3"
    assert unused_name(str(tmp_path), "iter-000008") == "iter-000008"


def test_without_sharded_checkpoints(tmp_path):
    assert read_sharded(str(tmp_path)) is None
    with pytest.raises(DataError, match="no sharded checkpoint 'best'"):
        consolidate(str(tmp_path), "best", str(tmp_path / "best.pt"))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16))
    with full_parameters(model):  # a model that is not sharded: nothing happens
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_the_fsdp_config_needs_fsdp_on_12_gb_cards():
    """config/train_fineweb_1b_fsdp.py: the parameters and the training-state arithmetic its comments give (float32
    weights and gradients, Muon's momentum on the block matrices, AdamW's two moments on the rest)."""
    cfg = with_vocab_size(load_train_config(["config/train_fineweb_1b_fsdp.py"]), 50267)  # GPT-2 data with the chat tokens
    assert cfg.parallel == "fsdp" and cfg.fsdp_sync_every_micro_batch and cfg.n_head % cfg.n_kv_head == 0
    assert all(cfg.gradient_accumulation_steps % gpus == 0 for gpus in (2, 4, 8))
    with torch.device("meta"):  # shapes only
        model = GPT(GPTConfig(**model_args(cfg)))
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 1) == 1185.3
    muon = sum(p.numel() for _, p in split_parameters(model)["muon"])
    state = 4 * params + 4 * params + 4 * muon + 8 * (params - muon)  # bytes
    assert round(state / 1e9, 1) == 14.6 and state / 2 ** 30 > 12  # more than a 12 GB card, before activations
    assert round(state / 2 / 2 ** 30, 1) == 6.8 and round(state / 8 / 2 ** 30, 1) == 1.7  # per card on 2 and 8

