"""ablate.py: a sweep of overlays x seeds through train.py, resumed where it stopped, and its comparison."""
import json

import pytest
from conftest import run_script

FAST = "--n_layer=2 --n_embd=64 --n_head=2 --block_size=32 --batch_size=4 --gradient_accumulation_steps=1 " \
       "--eval_iters=2 --condensation_seqs=2 --log_interval=1 --eval_interval=2 --compile=False --device=cpu"


def final_loss(run):
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    return evals[-1]["iter"], evals[-1]["val_loss"]


@pytest.mark.slow
def test_sweep_runs_resumes_and_compares(tmp_path, token_dir):
    out = tmp_path / "sweep"
    common = ["--base=config/train_tiny.py", "--variants=baseline,config/ablate_dispersion.py", f"--out_dir={out}",
              f"--data_dir={token_dir}"]
    # a sweep stopped half-way: two steps of seed 1 only
    run_script("ablate.py", *common, "--seeds=1", f"--train_args={FAST} --max_iters=2")
    assert final_loss(out / "baseline-s1")[0] == 2
    # the same sweep, to its end: seed 1's runs are resumed, seed 2's trained
    result = run_script("ablate.py", *common, "--seeds=1,2", f"--train_args={FAST} --max_iters=4")
    assert result.stdout.count("resuming") == 2 and result.stdout.count(": training") == 2
    runs = {f"{v}-s{s}": final_loss(out / f"{v}-s{s}") for v in ("baseline", "ablate_dispersion") for s in (1, 2)}
    assert {it for it, _ in runs.values()} == {4}
    # finished runs are left alone, and the report holds the paired differences
    again = run_script("ablate.py", *common, "--seeds=1,2", f"--train_args={FAST} --max_iters=4", "--markdown")
    assert again.stdout.count("already reached max_iters 4") == 4
    row = next(line for line in again.stdout.splitlines() if line.startswith("| ablate_dispersion"))
    d1 = runs["ablate_dispersion-s1"][1] - runs["baseline-s1"][1]
    d2 = runs["ablate_dispersion-s2"][1] - runs["baseline-s2"][1]
    assert "| 2/2 |" in row and f"s1 {d1:+.4f}" in row and f"s2 {d2:+.4f}" in row


def test_late_mean_cosine_takes_the_late_half_of_the_layers():
    from ablate import late_mean_cosine
    record = {"val_loss": 5.0, **{f"cond/mean_cos_l{layer}": 0.1 * layer for layer in range(7)}}  # 6 blocks: layers 0..6
    assert late_mean_cosine(record) == pytest.approx((0.4 + 0.5 + 0.6) / 3)  # blocks 3, 4, 5 (the last post-norm)
    assert late_mean_cosine({"val_loss": 5.0}) is None


@pytest.mark.slow
def test_sweep_errors_are_one_line(tmp_path):
    result = run_script("ablate.py", "--base=config/train_tiny.py", "--variants=baseline,config/nope.py", check=False)
    assert result.returncode == 1 and result.stderr.strip().endswith("no config file 'config/nope.py' (use 'baseline' for the base alone)")
    result = run_script("ablate.py", "--base=config/train_tiny.py", "--seeds=a,b", check=False)
    assert result.returncode == 1 and "seeds must be comma-separated integers" in result.stderr
