"""
The memory-light paths against their plain references (chunked cross-entropy == F.cross_entropy on the full
logits, activation checkpointing == none), and bench/bench_train.py through its real entry point on a CPU.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from bench import bench_train as bench
from model import GPT, GPTConfig, cross_entropy
from smallgpt.config import ConfigError
from conftest import run_script


def plain_ce(h, weight, targets):
    return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-1)


def ce_and_grads(loss_fn, h, weight, targets, scale=1.0):
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = loss_fn(h, weight, targets)
    (scale * loss).backward()  # scale: the 1/accum (and GradScaler) factor train_step puts on the loss
    return loss.detach(), h.grad, weight.grad


def random_problem(n=37, c=16, v=50, ignored=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g)
    weight = torch.randn(v, c, generator=g) * 0.5
    targets = torch.randint(v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:ignored]] = -1  # ignore_index=-1 positions
    return h, weight, targets


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 1000])  # chunks that divide N = 37 or not, one, or more than N
def test_chunked_ce_matches_plain_float32(chunk):
    h, weight, targets = random_problem()
    ref = ce_and_grads(plain_ce, h, weight, targets, scale=0.25)
    got = ce_and_grads(lambda a, b, t: cross_entropy(a, b, t, chunk), h, weight, targets, scale=0.25)
    for r, g, what in zip(ref, got, ("loss", "grad h", "grad weight")):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=what)
    assert got[1][targets == -1].abs().max() == 0  # ignored positions get no gradient
    h.requires_grad_()
    assert "Chunked" in cross_entropy(h, weight, targets, chunk).grad_fn.name()  # really the chunked path


def test_chunked_ce_without_grad_and_all_ignored():
    h, weight, targets = random_problem()
    with torch.no_grad():  # the evaluation path: chunked, no gradients computed
        torch.testing.assert_close(cross_entropy(h, weight, targets, 10), plain_ce(h, weight, targets))
    none = torch.full_like(targets, -1)
    loss, grad_h, grad_w = ce_and_grads(lambda a, b, t: cross_entropy(a, b, t, 10), h, weight, none)
    assert loss == 0 and grad_h.abs().max() == 0 and grad_w.abs().max() == 0  # no NaN from 0 / 0


def test_chunked_ce_matches_plain_under_bf16_autocast():
    h, weight, targets = random_problem(n=53, c=32, v=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ce_and_grads(plain_ce, h, weight, targets)
        got = ce_and_grads(lambda a, b, t: cross_entropy(a, b, t, 16), h, weight, targets)
    assert got[1].dtype == h.dtype and got[2].dtype == weight.dtype
    for r, g, what in zip(ref, got, ("loss", "grad h", "grad weight")):
        # both use the same bf16 logits; the gradients' bf16 matmuls are summed in a different order
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3, msg=what)


def tiny_model(**overrides):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=96, dropout=0.0)
    return GPT(GPTConfig(**{**args, **overrides}))


def model_loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    _, losses = model(x, y)
    losses["loss"].backward()
    return losses["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [dict(loss_chunk_size=7), dict(activation_checkpointing=True),
                                       dict(loss_chunk_size=7, activation_checkpointing=True, dispersion_coeff=0.1)])
def test_memory_options_give_the_same_loss_and_grads(overrides):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(96, (3, 16), generator=g)
    y = torch.randint(96, (3, 16), generator=g)
    y[0, :5] = -1
    reference = {"loss_chunk_size": 0, "dispersion_coeff": overrides.get("dispersion_coeff", 0.0)}
    ref_loss, ref_grads = model_loss_and_grads(tiny_model(**reference), x, y)  # T = 16: dispersion uses every token
    loss, grads = model_loss_and_grads(tiny_model(**overrides), x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_largest_fitting_finds_the_boundary():
    for limit_true in (0, 1, 5, 16, 17, 300):
        tried = []

        def fits(b):
            tried.append(b)
            return b <= limit_true
        assert bench.largest_fitting(fits, limit=512) == limit_true
        assert len(tried) == len(set(tried)) <= 20  # doubling then bisection: each size tried once
    assert bench.largest_fitting(lambda b: True, limit=100) == 64  # powers of two up to the limit


class FakeVariant:
    """Stands in for bench.Variant: a CUDA OOM beyond a given micro-batch, without a GPU."""
    largest = 5

    def __init__(self, name, cfg, device, dtype):
        self.batch_size, self.oom, self.released = cfg.batch_size, False, False

    def step(self):
        if self.batch_size > self.largest:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def release(self):
        self.released = True


def test_out_of_memory_is_caught_and_other_errors_are_not(monkeypatch):
    monkeypatch.setattr(bench, "Variant", FakeVariant)
    cfg = bench.BenchConfig(batch_size=1, gradient_accumulation_steps=8)
    assert bench.largest_fitting(lambda b: bench.fits("base", cfg, b, "cuda", "bfloat16")) == FakeVariant.largest
    too_big = bench.warm_up(FakeVariant("x", bench.BenchConfig(batch_size=6), "cuda", "bfloat16"), steps=2)
    assert too_big.oom and too_big.released
    assert bench.out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not bench.out_of_memory(RuntimeError("shape mismatch"))


TINY = ["config/train_tiny.py", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2",
        "--gradient_accumulation_steps=2", "--vocab_size=256", "--warmup=1", "--steps=2", "--rounds=2"]


@pytest.mark.slow
def test_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench.bench_train", *TINY, "--compare=dispersion,multipliers,loss_chunk_size=0", "--peak_flops=1e12",
                        f"--json_out={out}", timeout=240)
    report = json.loads(out.read_text())
    assert [v["name"] for v in report["variants"]] == ["base", "dispersion", "multipliers", "loss_chunk_size=0"]
    for v in report["variants"]:
        assert v["tokens_per_step"] == 2 * 16 * 2
        assert v["ms_per_step"] > 0 and v["tokens_per_s"] > 0 and v["model_tflops"] > 0 and v["step_time_ratio"] > 0
        assert v["mfu"] == pytest.approx(v["model_tflops"])  # against --peak_flops of 1 TFLOP/s
        assert v["peak_mem_gb"] is None  # no CUDA memory on a CPU: the process's peak RSS instead
        assert v["name"] in result.stdout  # one table row per variant
    assert report["variants"][0]["step_time_ratio"] == 1.0
    assert report["peak_rss_gb"] > 0 and report["device"] == "cpu"
    assert report["variants"][2]["params"] > report["variants"][0]["params"]  # the multipliers are really on


@pytest.mark.parametrize("args, message", [
    (["--compare=nonsense"], "unknown variant 'nonsense'"),
    (["--find_max_batch"], "need a CUDA device"),
])
@pytest.mark.slow
def test_bench_user_errors_are_one_line(args, message):
    result = run_script("bench.bench_train", "config/train_tiny.py", "--device=cpu", *args, check=False, timeout=60)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [(["--steps=0"], "steps >= 1"), (["--bench_steps=3"], "unknown key"),
                                           (["--compare=multipliers=cubic"], "multipliers must be"),
                                           (["--json_out=/no/such/dir/x.json"], "no such directory")])
def test_bench_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        bench.main(["config/train_tiny.py", "--device=cpu", *args])
