"""train.py under torchrun (DDP, gloo on CPU) computes what the single process computes with the same global
batch, and checkpoints move freely between the two."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_script

from smallgpt.checkpoint import load_checkpoint

# both research features on; block_size 32 < dispersion_max_tokens, so no random subsets are drawn (with
# subsampling each rank draws its own subsets, which differ from the single process's)
ARGS = ["config/train_tiny.py", "--dispersion_coeff=0.1", "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=4", "--eval_iters=4", "--eval_interval=5", "--log_interval=1",
        "--condensation_seqs=2", "--warmup_iters=2", "--lr_decay_iters=10", "--multipliers=vector",
        "--hellaswag_interval=5", f"--hellaswag_file={REPO / 'tests/fixtures/hellaswag_tiny.jsonl'}",
        "--hellaswag_items=5"]  # 5 items: rank 0 scores 3, rank 1 scores 2


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return ([r["loss"] for r in records if r["type"] == "train"],
            [r["val_loss"] for r in records if r["type"] == "eval"])


def evals(out_dir, key):
    with open(out_dir / "metrics.jsonl") as f:
        return [r[key] for r in map(json.loads, f) if r["type"] == "eval"]


def assert_same_weights(a_dir, b_dir):
    a, b = load_checkpoint(str(a_dir / "last.pt")), load_checkpoint(str(b_dir / "last.pt"))
    assert a["iter_num"] == b["iter_num"] and a["data_position"] == b["data_position"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def single(tmp_path_factory, token_dir):
    out = tmp_path_factory.mktemp("single")
    run_script("train.py", *ARGS, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=10")
    return out


def test_ddp_matches_single_process(tmp_path, token_dir, single):
    out = tmp_path / "ddp"
    result = torchrun(*ARGS, f"--data_dir={token_dir}", f"--out_dir={out}", "--max_iters=10")
    assert "2 process(es)" in result.stdout and "2 micro-batches per process" in result.stdout
    train_single, val_single = losses(single)
    train_ddp, val_ddp = losses(out)
    assert len(train_ddp) == 10 and len(val_ddp) == 3
    assert train_ddp == pytest.approx(train_single, rel=1e-5)
    assert val_ddp == pytest.approx(val_single, rel=1e-5)
    for key in ("val_bpb", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_items"):  # summed over ranks
        assert evals(out, key) == pytest.approx(evals(single, key), rel=1e-5) and len(evals(out, key)) == 3
    assert_same_weights(single, out)


def test_checkpoints_move_between_single_and_ddp(tmp_path, token_dir, single):
    ddp_first = tmp_path / "ddp_first"  # DDP to step 5, then one process to 10
    torchrun(*ARGS, f"--data_dir={token_dir}", f"--out_dir={ddp_first}", "--max_iters=5")
    run_script("train.py", *ARGS, f"--data_dir={token_dir}", f"--out_dir={ddp_first}", "--max_iters=10",
               "--init_from=resume")
    assert_same_weights(single, ddp_first)
    single_first = tmp_path / "single_first"  # one process to step 5, then DDP to 10
    run_script("train.py", *ARGS, f"--data_dir={token_dir}", f"--out_dir={single_first}", "--max_iters=5")
    torchrun(*ARGS, f"--data_dir={token_dir}", f"--out_dir={single_first}", "--max_iters=10", "--init_from=resume")
    assert_same_weights(single, single_first)
    assert losses(single_first)[0] == pytest.approx(losses(single)[0], rel=1e-5)


def test_accumulation_must_divide_by_world_size(tmp_path, token_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *ARGS,
           f"--data_dir={token_dir}", f"--out_dir={tmp_path}", "--gradient_accumulation_steps=3"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "gradient_accumulation_steps (3) must be divisible by the number of processes (2)" in result.stderr
