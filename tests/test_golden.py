"""The golden curve: config/train_tiny.py with deterministic=True, 20 steps on the shared sample's first 4,000
documents (conftest.token_dir), through train.py itself. Its per-step train losses and final val loss must equal
the committed fixture: exactly on the torch build and CPU instruction set that wrote it (both recorded in the
fixture), within TOLERANCE elsewhere. Every other test checks a mechanism; this one notices a change that quietly trains worse.

A change meant to move the curve updates the fixture on purpose, and says why in its commit:

    UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""
import json
import os

import pytest
import torch
from conftest import REPO, run_script

FIXTURE = REPO / "tests" / "fixtures" / "golden_curve.json"
ARGS = ["config/train_tiny.py", "--max_iters=20", "--eval_interval=20", "--eval_iters=4", "--condensation_seqs=0",
        "--log_interval=1", "--deterministic"]
# elsewhere (another torch build or instruction set): the same build's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) moved
# the AVX-512 fixture's values by at most 9.5e-7; a deliberate one-line change to the loss moved 20 of its 21 values
# by more than this, up to 0.012 (docs/reproducibility.md, "The golden curve")
TOLERANCE = 1e-4


def build():
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@pytest.mark.slow
def test_the_loss_curve_equals_the_golden_curve(tmp_path, token_dir):
    out = tmp_path / "golden"
    run_script("train.py", *ARGS, f"--data_dir={token_dir}", f"--out_dir={out}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = {"losses": [r["loss"] for r in records if r["type"] == "train"],
             "val_loss": [r["val_loss"] for r in records if r["type"] == "eval"][-1]}
    if os.environ.get("UPDATE_GOLDEN"):
        FIXTURE.write_text(json.dumps({"command": ["train.py", *ARGS], **build(), **curve}, indent=1) + "\n")
        return
    golden = json.loads(FIXTURE.read_text())
    exact = {k: golden[k] for k in build()} == build()
    got = curve["losses"] + [curve["val_loss"]]
    want = golden["losses"] + [golden["val_loss"]]
    names = [f"step {i} train loss" for i in range(len(curve["losses"]))] + ["final val loss"]
    assert len(got) == len(want), f"the golden run logged {len(got) - 1} steps, the fixture {len(want) - 1}"
    moved = [f"{name}: {a!r} (fixture {b!r})" for name, a, b in zip(names, got, want)
             if (a != b if exact else abs(a - b) > TOLERANCE)]
    assert not moved, (
        f"the loss curve moved ({'exactly compared: same torch build and CPU' if exact else f'tolerance {TOLERANCE}'}"
        f"): {len(moved)} of {len(want)} values differ, first {moved[0]}. If the change is meant to change training, "
        f"update the fixture on purpose: UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py, and say why in the "
        f"commit message")
