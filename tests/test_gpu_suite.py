"""
bench/gpu_suite.py: the CPU dry run through the real entry point (every part's code path, its markdown and JSON; the
FSDP part in a process group of one),
the part runner (a failure, an out-of-memory and a spent budget stop only their own part), and on a GPU the
CUDA-only paths the suite relies on: torch.compile + bf16 autocast + fused AdamW, pinned-memory copies, the
memory cap and torch.cuda.mem_get_info (skipped without a GPU).
"""
import importlib.util
import json
import time
from dataclasses import replace

import pytest
import torch

from bench import gpu_suite
from bench.bench_train import GB, BenchConfig, Variant, free_device_memory, out_of_memory
from conftest import REPO, run_script
from smallgpt.device import to_device
from smallgpt.errors import ConfigError


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def expected_skips():
    """Parts that skip, with a note, until the code they measure has landed."""
    skips = set() if gpu_suite.has_key("optimizer") else {"muon"}
    return skips | {name for name, _, _, args, _ in gpu_suite.PARTS
                    if args and not (REPO / args[0]).exists()}


def run_dry(tmp_path, *args):
    out = tmp_path / "suite.json"
    result = run_script("bench.gpu_suite", "--dry_run", f"--json_out={out}", *args, timeout=900)
    return result, json.loads(out.read_text()), out.with_suffix(".md").read_text()


def check_report(report, markdown, stdout):
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == [p[0] for p in gpu_suite.PARTS] and report["not_run"] == []
    for name, part in parts.items():
        if name in expected_skips():
            assert part["status"].startswith("skipped: ") and not part["rows"]
            continue
        assert part["status"] == "ok", (name, part["status"])
        assert part["rows"] and part["title"] in markdown
        for row in part["rows"]:
            assert row.get("tokens_per_s", 1) > 0 and row.get("ms_per_step", 1) > 0
    smoke = parts["smoke"]["rows"][0]
    assert smoke["result"] == "pass" and smoke["last"] < smoke["first"] - gpu_suite.SMOKE_FALL
    peak = report["environment"]["peak_flops"]  # 1 TFLOP/s in a CPU dry run; the GPU's own peak on a GPU
    for name in ("fit_40m", "fit_124m"):
        row = parts[name]["rows"][0]
        assert row["batch_size"] == gpu_suite.DRY_RUN_MAX_BATCH  # nothing runs out of memory at tiny sizes
        if peak:  # the projection: tokens/s scaled by the 4070's peak over this device's
            assert row["mfu"] == pytest.approx(row["model_tflops"] * 1e12 / peak)
            assert row["rtx4070_tokens_per_s"] == pytest.approx(row["tokens_per_s"] * 58.3e12 / peak)
    plan_rows = parts["plan"]["rows"]
    assert [r["config"] for r in plan_rows] == [p.split("/")[1] for p in gpu_suite.PLAN_CONFIGS]
    if report["environment"]["device"] == "cpu":  # live tensors against the plan (on a GPU, a tiny model's peak
        # is mostly cuBLAS's workspace, which the plan leaves to its allowance)
        assert all(r["ratio"] == pytest.approx(1, abs=0.15) and r["state_ratio"] == pytest.approx(1, abs=0.01)
                   for r in plan_rows)
    for name in ("loss_memory", "overheads"):
        rows = parts[name]["rows"]
        assert len(rows) == 3 and rows[0]["ratio"] == [1.0, 1.0, 1.0] and all(r["ratio"][0] > 0 for r in rows)
    assert [r["name"] for r in parts["fsdp"]["rows"]] == ["one process", "DDP, 1 process", "FSDP, 1 process"]
    assert [(r["mode"], r["batch"]) for r in parts["sample"]["rows"]] == [
        ("eager", 1), ("eager", 8), ("compiled", 1), ("compiled", 8)]
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_lines and all(line in stdout for line in table_lines)  # printed as well as written


@pytest.mark.slow
def test_dry_run_on_cpu_runs_every_part(tmp_path):
    result, report, markdown = run_dry(tmp_path)
    env = report["environment"]
    assert env["device"] == "cpu" and env["dry_run"] and env["peak_flops"] == 1e12
    assert "Dry run" in markdown and "not a measurement" in markdown  # the 4070 projection says what it is
    assert "- fits 12 GiB at micro-batch >= 16: largest 4, NOT met" in markdown  # the target, judged
    check_report(report, markdown, result.stdout)


@pytest.mark.slow
def test_parts_and_total_budget(tmp_path):
    _, report, markdown = run_dry(tmp_path, "--parts=muon,overheads", "--total_minutes=0.1")
    # 6 s in all is less than a part needs to be started: both are listed with the command that runs them
    assert report["parts"] == [] and report["not_run"] == ["overheads", "muon"]
    assert "`python -m bench.gpu_suite --parts=overheads,muon`" in markdown


@pytest.mark.slow
def test_unknown_part_is_one_line():
    result = run_script("bench.gpu_suite", "--dry_run", "--parts=smoke,nonsense", check=False, timeout=120)
    assert result.returncode != 0 and "unknown part 'nonsense'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_no_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="not available"):
        gpu_suite.main(["--device=cuda"])


@pytest.mark.slow
def test_a_failing_part_stops_only_itself(capsys):
    suite = gpu_suite.Suite(gpu_suite.SuiteConfig(dry_run=True))
    column = ("x", "x", "{}")

    def oom(suite, table):
        table.set_columns(column)
        table.add(x=1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken(suite, table):
        raise ValueError("a bug")

    def slow(suite, table):
        table.set_columns(column)
        for i in range(1000):
            suite.check()
            table.add(x=i)
            time.sleep(0.01)

    def fine(suite, table):
        table.set_columns(column)
        table.add(x=2)

    parts = [("oom", "t", oom, (), 10), ("broken", "t", broken, (), 10), ("slow", "t", slow, (), 0.1),
             ("fine", "t", fine, (), 10)]
    tables, not_run = gpu_suite.run_parts(suite, parts, total_s=60)
    assert tables[0].status.startswith("FAILED: out of memory: CUDA out of memory") and tables[0].rows == [{"x": 1}]
    assert tables[1].status == "FAILED: ValueError: a bug"
    assert tables[2].status.startswith("stopped: ") and 1 <= len(tables[2].rows) < 100
    assert tables[3].status == "ok" and tables[3].rows == [{"x": 2}] and not_run == []
    assert "ValueError: a bug" in capsys.readouterr().err  # the cause, with its traceback
    assert suite.deadline == float("inf")  # no budget left behind for code that runs after the parts


@pytest.mark.slow
def test_fit_part_caps_memory_and_steps_down_when_compiled_needs_more(monkeypatch):
    suite = gpu_suite.Suite(gpu_suite.SuiteConfig(dry_run=True))
    caps, measured = [], []
    monkeypatch.setattr(suite, "cap", caps.append)
    monkeypatch.setattr(gpu_suite, "fits", lambda name, cfg, batch, device, dtype: batch <= 3)  # the eager search
    real_measure = suite.measure

    def measure(name, cfg):  # as if the compiled model ran out of memory at the size the eager search found
        measured.append(cfg.batch_size)
        v = real_measure(name, cfg)
        v.oom = cfg.batch_size == 3
        return v
    monkeypatch.setattr(suite, "measure", measure)
    table = gpu_suite.Table("fit", "t")
    gpu_suite.part_fit(suite, table, "config/train_fineweb_40m.py")
    assert measured == [3, 2] and [r["batch_size"] for r in table.rows] == [2]
    assert caps == [suite.max_memory_gb, 0]  # capped for the search and the measurement, then lifted


# -----------------------------------------------------------------------------
# The CUDA-only paths (skipped on a CPU)

def tiny_cuda_config(**overrides):
    return BenchConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, batch_size=4,
                       gradient_accumulation_steps=2, learning_rate=1e-2, device="cuda", dtype="bfloat16",
                       compile=True, **overrides)


@cuda
@pytest.mark.slow
def test_compiled_bf16_step_with_fused_adamw_on_cuda():
    torch._dynamo.reset()
    cfg = tiny_cuda_config()
    eager = Variant("eager", replace(cfg, compile=False), "cuda", "bfloat16")
    compiled = Variant("compiled", cfg, "cuda", "bfloat16")
    assert compiled.optimizer.defaults["fused"]  # one fused AdamW kernel on CUDA
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    x, _ = eager.get_batch(0)
    with eager.ctx:
        logits, _ = eager.raw_model(x)
    assert logits.dtype == torch.bfloat16  # autocast is on
    assert all(p.is_cuda and p.dtype == torch.float32 for p in compiled.raw_model.parameters())  # fp32 master weights
    eager.step()
    compiled.step()
    first = compiled.loss
    assert abs(first - eager.loss) < gpu_suite.SMOKE_MATCH  # same weights, same tokens: the compiled path is right
    for _ in range(40):
        compiled.step()
    assert compiled.loss < first - 1.0  # and it trains (fixed windows are learnt fast)
    eager.release()
    compiled.release()


@cuda
def test_pinned_copy_to_cuda():
    t = torch.arange(4 * 65, dtype=torch.int64).view(4, 65)
    assert t.pin_memory().is_pinned()
    out = to_device(t[:, :-1], "cuda")  # train.py's copy: pinned, non_blocking
    torch.cuda.synchronize()
    assert out.is_cuda and torch.equal(out.cpu(), t[:, :-1])


@cuda
def test_memory_cap_raises_out_of_memory_then_lifts():
    suite = gpu_suite.Suite(gpu_suite.SuiteConfig(device="cuda"))
    free_device_memory()
    suite.cap(1)  # 1 GiB
    try:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            torch.empty(int(1.5 * GB), dtype=torch.uint8, device="cuda")
        assert out_of_memory(caught.value)
    finally:
        suite.cap(0)
    big = torch.empty(int(1.5 * GB), dtype=torch.uint8, device="cuda")  # allowed again without the cap
    del big
    free_device_memory()


@cuda
def test_environment_reads_mem_get_info():
    suite = gpu_suite.Suite(gpu_suite.SuiteConfig(device="cuda"))
    env = gpu_suite.environment(suite)
    total = torch.cuda.get_device_properties(0).total_memory / GB
    assert 0 < env["gpu_free_gb"] <= env["gpu_total_gb"] == pytest.approx(total)
    assert env["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") and env["compile"]


@cuda
@pytest.mark.slow
def test_dry_run_on_cuda_compiles_every_part(tmp_path):
    result, report, markdown = run_dry(tmp_path, "--device=cuda", "--total_minutes=9")  # ~15 small compiles
    env = report["environment"]
    assert env["device"] == "cuda" and env["compile"] and env["gpu_total_gb"] > 0
    check_report(report, markdown, result.stdout)
    fit = next(p for p in report["parts"] if p["name"] == "fit_40m")["rows"][0]
    assert 0 < fit["peak_mem_gb"] <= fit["peak_reserved_gb"] <= 12  # CUDA memory figures, under the cap
