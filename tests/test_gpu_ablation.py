"""
bench/gpu_ablation.py: the CPU dry run through the real entry point (four variants on the shared sample, prepared on
the fly, equal tokens, every column of the report), the plan from measured times, the compressed schedule, the
rounds that stop every run at the same step, the runs' shared data order, the one-line mistakes, and on a GPU the
dry run compiled (skipped without one).
"""
import json
import math

import numpy as np
import pytest
import torch

from bench import gpu_ablation
from conftest import REPO, needs_tokenizer, run_script
from smallgpt.config import load_train_config
from smallgpt.errors import ConfigError, DataError
from smallgpt.config import with_vocab_size
from smallgpt.tokens import TrainWindows


def run_dry(tmp_path, sample_parquet, *args):
    out = tmp_path / "ablation.json"
    result = run_script("bench.gpu_ablation", "--dry_run", f"--sample={sample_parquet}",
                        f"--sample_dir={tmp_path / 'sample'}", f"--json_out={out}", *args, timeout=900)
    return result, json.loads(out.read_text()), out.with_suffix(".md").read_text()


def check_report(report, markdown, stdout):
    """Four variants, every one at the same steps and tokens, learning, with every column of the report."""
    runs, rows = report["runs"], {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in runs] == list(gpu_ablation.VARIANTS) and report["plan"]["steps"] == 8
    assert report["plan"]["budget_steps"] >= gpu_ablation.MIN_STEPS  # computed from the measured step times
    for run in runs:
        assert run["steps"] == 8 and [e["iter"] for e in run["evals"]] == [0, 2, 4, 6, 8]
        assert [e["tokens"] for e in run["evals"]] == [e["tokens"] for e in runs[0]["evals"]]  # equal tokens
        assert run["evals"][-1]["val_loss"] < run["evals"][0]["val_loss"]  # it trained
        assert run["config"]["max_iters"] == 8 and run["config"]["seed"] == 1 and run["compile_s"] > 0
    configs = {r["name"]: r["config"] for r in runs}
    assert configs["dispersion"]["dispersion_coeff"] == 0.1 and configs["dispersion"]["dispersion_layers"] == "all"
    assert configs["multipliers"]["multipliers"] == "vector" and configs["baseline"]["optimizer"] == "adamw"
    assert configs["modern"]["optimizer"] == "muon" and configs["modern"]["mlp"] == "swiglu"
    for name, row in rows.items():
        assert math.isfinite(row["val_loss"]) and 0 < row["val_bpb"] < row["val_loss"]
        assert row["tokens_per_s"] > 0 and row["wall_s"] >= row["train_s"] > 0
        assert all(row[k] is not None for k in ("mid_mu", "late_mu", "spearman"))
        expected = None if name == "baseline" else row["val_loss"] - rows["baseline"]["val_loss"]
        assert row["delta"] == pytest.approx(expected)
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_lines and all(line in stdout for line in table_lines)  # printed as well as written


@pytest.mark.slow
def test_dry_run_on_cpu_trains_every_variant_on_equal_tokens(tmp_path, sample_parquet):
    result, report, markdown = run_dry(tmp_path, sample_parquet)
    assert report["environment"]["device"] == "cpu" and report["environment"]["dry_run"]
    assert (tmp_path / "sample" / "manifest.json").is_file()  # the fallback, prepared on the fly
    assert "NOT FineWeb" in markdown and "Dry run" in markdown and "capped at 8" in markdown
    check_report(report, markdown, result.stdout)


def test_a_variant_that_cannot_run_is_left_out_and_the_others_train(tmp_path, token_dir, monkeypatch, capsys):
    real_probe = gpu_ablation.probe

    def probe(run, evaluator):  # as if the modern block's graph did not compile on this machine
        if run.name == "modern":
            raise gpu_ablation.DataError("torch.compile cannot build its kernels (a test)")
        real_probe(run, evaluator)
    monkeypatch.setattr(gpu_ablation, "probe", probe)
    out = tmp_path / "ablation.json"
    gpu_ablation.main(["--dry_run", f"--data_dir={token_dir}", f"--json_out={out}"])
    report, markdown = json.loads(out.read_text()), out.with_suffix(".md").read_text()
    assert [r["name"] for r in report["runs"]] == ["baseline", "dispersion", "multipliers"]
    assert report["left_out"] == ["modern s1: DataError: torch.compile cannot build its kernels (a test)"]
    assert "Left out (failed before training):** modern s1" in markdown and "NOT FineWeb" not in markdown
    assert all(r["steps"] == 8 for r in report["runs"])
    assert "DataError" in capsys.readouterr().err  # the cause, with its traceback


def test_plan_from_measured_times():
    plan = gpu_ablation.plan_steps(100, step_s=[0.5, 0.5], eval_s=[2, 3], eval_points=4)
    assert plan.round_s == 1 and plan.eval_round_s == 5
    assert plan.steps == plan.budget_steps == 80 and plan.eval_at == [20, 40, 60, 80]  # (100 - 4 x 5) / 1
    capped = gpu_ablation.plan_steps(100, step_s=[0.5, 0.5], eval_s=[2, 3], eval_points=4, max_steps=30)
    assert capped.steps == 30 and capped.budget_steps == 80 and capped.eval_at == [8, 15, 22, 30]
    with pytest.raises(ConfigError, match="raise --minutes"):  # (40 - 4 x 5) / 1 = 20 steps: just enough
        gpu_ablation.plan_steps(39, step_s=[0.5, 0.5], eval_s=[2, 3], eval_points=4)
    assert gpu_ablation.plan_steps(40, step_s=[0.5, 0.5], eval_s=[2, 3], eval_points=4).steps == 20


def test_schedule_is_the_configs_compressed():
    cfg = load_train_config([str(REPO / "config/train_fineweb_40m_modern.py")])
    short = gpu_ablation.compressed_schedule(cfg, 400)  # 300 of 6,000 steps -> 20 of 400
    assert (short.max_iters, short.lr_decay_iters, short.warmup_iters, short.muon_momentum_warmup) == (400, 400, 20, 20)
    assert (short.learning_rate, short.min_lr, short.muon_lr) == (cfg.learning_rate, cfg.min_lr, cfg.muon_lr)


class FakeRun:
    def __init__(self, label):
        self.label, self.iter_num, self.train_s, self.evals = label, 0, 0.0, []

    def train_step(self):
        self.iter_num += 1
        return 0.01

    def evaluate(self, evaluator):
        self.evals.append({"iter": self.iter_num, "val_loss": 5.0})


def test_rounds_stop_every_run_at_the_same_step_and_evaluate_there():
    runs = [FakeRun("a"), FakeRun("b"), FakeRun("c")]
    plan = gpu_ablation.Plan(steps=10, budget_steps=10, eval_at=[4, 10], round_s=0.03, eval_round_s=0.1)
    saves = []
    steps = gpu_ablation.train_rounds(runs, plan, None, out_of_time=lambda step: step >= 7,
                                      save=lambda: saves.append(1))
    assert steps == 7 and [r.iter_num for r in runs] == [7, 7, 7]
    assert all([e["iter"] for e in r.evals] == [4, 7] for r in runs) and len(saves) == 2
    runs = [FakeRun("a"), FakeRun("b")]
    assert gpu_ablation.train_rounds(runs, plan, None, out_of_time=lambda step: False) == 10
    assert all([e["iter"] for e in r.evals] == [4, 10] for r in runs)  # no extra evaluation at a planned end


def test_every_variant_of_a_seed_reads_train_pys_windows():
    tokens = np.random.default_rng(0).integers(50257, size=20_000).astype(np.uint16)
    cfg = gpu_ablation.AblationConfig(dry_run=True, **gpu_ablation.DRY_RUN_KEYS)
    windows = TrainWindows(tokens, 32, seed=3, vocab_size=50257)
    configs = [with_vocab_size(gpu_ablation.run_config(gpu_ablation.VARIANTS[name], 3, cfg, "cpu", "float32"), 50257)
               for name in ("baseline", "modern")]  # as start_runs has them for GPT-2 data
    runs = [gpu_ablation.Run(name, c, "cpu", "float32", windows) for name, c in zip(("baseline", "modern"), configs)]
    reference = TrainWindows(tokens, 32, seed=3, vocab_size=50257)
    for step in range(3):
        for micro in range(cfg.accum):
            data_position = step * cfg.accum * cfg.batch_size  # train.py: windows consumed before this step
            x, y = reference.batch(data_position + micro * cfg.batch_size, cfg.batch_size)
            for run in runs:
                run.iter_num = step
                assert torch.equal(run.get_batch(micro)[0], x) and torch.equal(run.get_batch(micro)[1], y)


def test_command_line_mistakes(tmp_path):
    check = lambda **kw: gpu_ablation.check(gpu_ablation.AblationConfig(**kw))
    assert check(variants="modern,baseline") == (["baseline", "modern"], [1])  # the reference first
    with pytest.raises(ConfigError, match="holds baseline"):
        check(variants="dispersion,modern")
    with pytest.raises(ConfigError, match="variants"):
        check(variants="baseline,nope")
    with pytest.raises(ConfigError, match="seeds must be comma-separated integers"):
        check(seeds="1,x")
    with pytest.raises(ConfigError, match="minutes must be positive"):
        check(minutes=0.0)
    with pytest.raises(DataError, match="no data: pass --data_dir"):
        gpu_ablation.find_data(gpu_ablation.AblationConfig(sample=str(tmp_path / "none.parquet")))


def test_a_data_dir_is_described_by_its_sources(tmp_path):
    meta = {"format": "gpt-tokens", "version": 1, "vocab_size": 50257,
            "splits": {s: {"tokens": 10, "bytes": 30} for s in ("train", "val")},
            "sources": [{"path": f"/data/fineweb/00{i}_00000.parquet"} for i in range(5)]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = gpu_ablation.AblationConfig(data_dir=str(tmp_path), sample=str(tmp_path / "none.parquet"))
    data_dir, note = gpu_ablation.find_data(cfg)
    assert data_dir == str(tmp_path) and "000_00000.parquet, 001_00000.parquet, 002_00000.parquet and 2 more" in note
    assert "NOT FineWeb" not in note


@needs_tokenizer
def test_a_directory_of_shards_is_described_and_recognised(tmp_path):
    from test_prepare import run_main, write_parquet
    parquet = write_parquet(tmp_path / "english-sample.parquet", [f"document {i}" for i in range(gpu_ablation.SAMPLE_VAL_DOCS + 50)])
    out = tmp_path / "prepared"
    assert run_main(parquet, f"--out_dir={out}", f"--val_docs={gpu_ablation.SAMPLE_VAL_DOCS}", "--num_proc=1") is None
    assert gpu_ablation.prepared_from(str(out), str(parquet))
    assert not gpu_ablation.prepared_from(str(out), str(tmp_path / "other.parquet"))
    _, note = gpu_ablation.find_data(gpu_ablation.AblationConfig(data_dir=str(out), sample=str(parquet)))
    assert "(sources: english-sample.parquet)" in note


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_no_gpu_is_a_config_error_unless_dry_run():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        gpu_ablation.main(["--data_dir=data/fineweb"])


@pytest.mark.slow
def test_a_mistake_is_one_line():
    result = run_script("bench.gpu_ablation", "--dry_run", "--variants=baseline,nope", check=False, timeout=120)
    assert result.returncode != 0 and "variants: a comma-separated list" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.slow
def test_dry_run_on_cuda_compiles_every_variant(tmp_path, sample_parquet):
    result, report, markdown = run_dry(tmp_path, sample_parquet, "--device=cuda", "--minutes=6")
    env = report["environment"]
    assert env["device"] == "cuda" and env["compile"] and env["dtype"] in ("bfloat16", "float16")
    assert all(r["config"]["compile"] for r in report["runs"]) and env["peak_allocated_gb"] > 0
    check_report(report, markdown, result.stdout)
