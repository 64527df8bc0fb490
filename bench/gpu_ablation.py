"""
The research question at 40M on a GPU, in one command of about 8 minutes (issue 34): do the dispersion loss, the
learnable multipliers or the modern recipe change the 40M run's loss at equal tokens?

    python -m bench.gpu_ablation --data_dir=data/fineweb    # a FineWeb directory of data/fineweb/prepare.py
    python -m bench.gpu_ablation                            # the shared English sample instead (NOT FineWeb)
    python -m bench.gpu_ablation --dry_run                  # tiny models on the CPU, every code path (CI runs it)

Four variants of config/train_fineweb_40m.py (VARIANTS): the GPT-2 recipe (baseline), + the dispersion loss
(config/ablate_dispersion.py, the authors' setting), + the learnable multipliers (config/ablate_multipliers.py),
and the modern recipe (config/train_fineweb_40m_modern.py: the modern block with Muon). They train in one
process with train.py's own pieces (build_model, the optimizer, train_step, get_lr, the Evaluator), in bf16 and
compiled, on the same training windows in the same order (the seed's), and are evaluated on the same fixed
validation windows: val loss, bits per byte, and the condensation of the hidden states.

How the budget (--minutes, everything after start-up included) is kept on any GPU:
  1. probe: each run is evaluated once (its step 0, eagerly) and takes PROBE_STEPS + 1 training steps, the first
     of which compiles; the probe's steps are then undone (initial weights, a fresh optimizer), so the graph stays
     compiled and the run starts clean;
  2. plan: from the measured step and evaluation times, the number of steps every run can take in what is left
     (less a margin), the same for all: equal tokens. The configs' schedule (warm-up, cosine decay to min_lr,
     Muon's momentum warm-up) is compressed to that many steps;
  3. train in rounds, one step of every run per round, so all runs are always at the same step: if the estimate
     was too optimistic, the runs stop together at equal tokens before the budget is spent, and any drift in the
     GPU's speed hits them alike.
A variant whose probe fails (it does not compile, it runs out of memory) is left out, its cause printed and
reported, and the others go on; only the baseline's failure stops the command.
Output: the tables on stdout, then as markdown for docs/RESULTS.md and BENCHMARKS.md, in --json_out (every figure,
each run's resolved config; rewritten at every evaluation, so a killed command keeps what it finished) and beside
it as .md at the end.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace

if not __package__:  # run as a file, the repository root is not on the path: say how to run it
    sys.exit(f"run it from the repository root as: python -m bench.{os.path.basename(__file__)[:-3]} ...")

import torch

from ablate import late_mean_cosine, mean_spread
from bench.bench_train import GB, Variant, device_name, out_of_memory
from bench.gpu_suite import INT, PCT, Table
from smallgpt.config import load_train_config, parse_args, with_vocab_size
from smallgpt.device import peak_flops, select_device, select_dtype, to_device
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.monitor import compile_failure, probe_compiled
from smallgpt.optim import configure_optimizer
from smallgpt.shards import open_split, read_meta
from smallgpt.tokenizer import open_tokenizer, seed_tiktoken_cache
from smallgpt.tokens import TrainWindows
from train import Evaluator, Runtime, get_lr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {  # name -> config files, applied in order (as train.py applies them)
    "baseline": ["config/train_fineweb_40m.py"],  # the GPT-2 recipe: GPT-2 block, AdamW
    "dispersion": ["config/train_fineweb_40m.py", "config/ablate_dispersion.py"],  # lambda 0.1, tau 1, all blocks
    "multipliers": ["config/train_fineweb_40m.py", "config/ablate_multipliers.py"],  # row/column, channel, token
    "modern": ["config/train_fineweb_40m_modern.py"],  # RoPE, RMSNorm, QK-norm, SwiGLU + Muon
}
PROBE_STEPS = 3  # timed steps per run after the compiling one: its step time for the plan
MIN_STEPS = 20  # fewer steps per run than this compare nothing: the command stops and asks for more minutes
MARGIN = 0.05  # of the budget, kept free: the step times come from a few steps just after compiling
SAMPLE_VAL_DOCS = 1000  # the fallback's held-out documents: 381k val tokens of the sample's 8.6M
# dry run: a tiny model (GPT-2's vocabulary: the tokens are real) and a few steps, on the CPU by default
DRY_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--condensation_seqs=4",
           "--learning_rate=1e-2"]  # a large lr: the loss visibly falls in 8 steps
DRY_RUN_KEYS = dict(batch_size=2, accum=2, eval_iters=2, max_steps=8)


@dataclass
class AblationConfig:
    data_dir: str = ""  # a prepared FineWeb directory (of data/fineweb/prepare.py); '' = the shared English sample
    sample: str = "../shared/data/english-sample.parquet"  # the fallback's parquet (not FineWeb), prepared on the fly
    sample_dir: str = "data/english-sample"  # where the fallback's token files go (prepared once, then reused)
    variants: str = ",".join(VARIANTS)  # comma-separated, from: baseline (needed), dispersion, multipliers, modern
    seeds: str = "1"  # comma-separated; each seed fixes the initial weights and the data order of every variant
    minutes: float = 8.0  # the whole command's budget: data, compiles, training and evaluations
    batch_size: int = 16  # micro-batch in sequences (the 40M configs'); 8 with accum=16 where 16 does not fit
    accum: int = 8  # micro-batches per step: 16 x 1024 x 8 = 131,072 tokens, a quarter of the configs' (4x the steps)
    eval_points: int = 4  # evaluations during training, evenly spaced, the last at the end (plus step 0)
    eval_iters: int = 50  # val micro-batches per evaluation (fixed windows; fewer if the val split is smaller)
    max_steps: int = 0  # cap on the planned steps; 0 = as many as the budget allows
    dry_run: bool = False  # tiny models and 8 steps: a check of every code path (on the CPU unless --device)
    device: str = "auto"  # 'auto' (cuda; the CPU in a dry run) | 'cuda' | 'cuda:1' | 'cpu' (dry run only)
    json_out: str = "out/gpu_ablation.json"  # every figure as JSON; the markdown goes beside it (.md)


def check(cfg):
    """The command line's mistakes, before any data or GPU work. Returns (variant names, seeds)."""
    names = [n.strip() for n in cfg.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "baseline" not in names:
        raise ConfigError(f"variants: a comma-separated list of {', '.join(VARIANTS)} that holds baseline "
                          f"(the reference), not {cfg.variants!r}")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"seeds must be comma-separated integers, not {cfg.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: at least one, none twice, not {cfg.seeds!r}")
    for key in ("minutes", "batch_size", "accum", "eval_points", "eval_iters"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, not {getattr(cfg, key)}")
    if cfg.max_steps < 0:
        raise ConfigError(f"max_steps must not be negative, not {cfg.max_steps}")
    return ["baseline"] + [n for n in names if n != "baseline"], seeds


# -----------------------------------------------------------------------------
# Data: a FineWeb directory passed in, or the shared English sample prepared on the fly

def find_data(cfg):
    """(token directory, one line saying what the data is). The fallback is prepared by prepare.py once."""
    shared = os.path.dirname(os.path.abspath(cfg.sample))
    if all(os.path.isfile(os.path.join(shared, n)) for n in ("vocab.bpe", "encoder.json")):
        seed_tiktoken_cache(shared)  # offline machines: GPT-2's BPE files beside the sample, as the tests use them
    if cfg.data_dir:
        meta = read_meta(cfg.data_dir)  # a missing or foreign directory fails here, in one line
        names = input_names(meta)
        sources, more = ", ".join(names[:3]), len(names) - 3
        return cfg.data_dir, (f"token files in `{cfg.data_dir}` from prepare.py (sources: {sources}"
                              f"{f' and {more} more' if more > 0 else ''})")
    if not os.path.isfile(cfg.sample):
        raise DataError(f"no data: pass --data_dir (a prepared FineWeb directory), or --sample=PATH to the shared "
                        f"English sample (no file at {cfg.sample})")
    note = (f"**the shared English sample (`{os.path.basename(cfg.sample)}`: fortune files and dictionary entries), "
            f"NOT FineWeb**; prepared with {SAMPLE_VAL_DOCS} held-out documents")
    if not prepared_from(cfg.sample_dir, cfg.sample):
        print(f"preparing {cfg.sample} into {cfg.sample_dir} (once)", flush=True)
        command = [sys.executable, os.path.join(REPO, "data/fineweb/prepare.py"), cfg.sample,
                   f"--out_dir={cfg.sample_dir}", f"--val_docs={SAMPLE_VAL_DOCS}"]
        if subprocess.run(command).returncode != 0:
            raise DataError(f"preparing {cfg.sample} failed (above)")
    return cfg.sample_dir, note


def input_names(meta):
    """The file names a data directory was prepared from: its manifest's inputs (or an older meta.json's sources)."""
    return [os.path.basename(s.get("source") or s.get("path")) for s in meta.get("inputs") or meta.get("sources", [])]


def prepared_from(data_dir, parquet):
    """Whether data_dir holds complete token files of this parquet with the fallback's split."""
    try:
        meta = read_meta(data_dir)
    except DataError:
        return False
    if "inputs" in meta:  # a directory of shards: its split rule, every input read to the end
        split_ok = meta["split"]["val_docs"] == SAMPLE_VAL_DOCS and all(e["complete"] for e in meta["inputs"])
    else:  # the single-file format of an older prepare.py, still read
        split_ok = meta["options"].get("val_docs") == SAMPLE_VAL_DOCS and meta["options"].get("max_docs") is None
    return split_ok and input_names(meta) == [os.path.basename(parquet)]


# -----------------------------------------------------------------------------
# One run: a variant and a seed, stepped by train.py's train_step on the real windows

class Run(Variant):
    """bench_train's Variant (train.py's model, optimizer, autocast and train_step; compiled on a GPU) fed with
    the training windows in train.py's order, with train.py's lr schedule, and its own figures."""

    def __init__(self, name, cfg, device, dtype, windows):
        super().__init__(name, cfg, device, dtype)  # seeded: the same initial weights wherever the shapes agree
        self.seed, self.data, self.windows = cfg.seed, windows, None  # Variant's random windows are not used
        self.iter_num, self.n_layer = 0, cfg.n_layer
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.initial = {k: v.detach().to("cpu", copy=True) for k, v in self.raw_model.state_dict().items()}
        self.compile_s, self.probe_s, self.train_s, self.eval_s = 0.0, [], 0.0, 0.0
        self.evals = []  # one dict per evaluation: iter, tokens, val_loss, val_bpb, cond/...

    @property
    def label(self):
        return f"{self.name} s{self.seed}"

    def get_batch(self, micro):
        """Micro-batch `micro` of this step: windows numbered as train.py numbers them (data_position)."""
        first = (self.iter_num * self.cfg.gradient_accumulation_steps + micro) * self.cfg.batch_size
        return tuple(to_device(t, self.device) for t in self.data.batch(first, self.cfg.batch_size))

    def train_step(self):
        """One optimizer step at the schedule's lr, as train.py's loop sets it; returns its seconds."""
        lr = get_lr(self.iter_num, self.cfg)
        for group in self.optimizer.param_groups:  # each group's lr_scale: Muon, embeddings, multipliers (optim.py)
            group["lr"] = lr * group["lr_scale"]
        seconds, _ = self.step()  # waits for the device (it reads the loss)
        self.iter_num += 1
        if not math.isfinite(self.loss):
            raise DataError(f"{self.label}: the loss is {self.loss} at step {self.iter_num}")
        return seconds

    def evaluate(self, evaluator):
        t0 = time.perf_counter()
        result = evaluator(self.raw_model, self.raw_model, self.iter_num)  # eager: no second compile per run
        self.eval_s += time.perf_counter() - t0
        self.evals.append({"iter": self.iter_num, "tokens": self.iter_num * self.tokens_per_step, **result})

    def restart(self, cfg):
        """The initial weights (copied into the same tensors: the compiled graph stays valid), a fresh optimizer
        and cfg's schedule: the probe's steps leave no trace."""
        self.raw_model.load_state_dict(self.initial)
        self.cfg, self.iter_num = cfg, 0
        self.optimizer = configure_optimizer(self.raw_model, cfg, self.device.split(":")[0])


def run_config(files, seed, cfg, device, dtype):
    """A variant's train.py config: its files, then this command's batch, device and seed (dry run: tiny sizes)."""
    return load_train_config([os.path.join(REPO, f) for f in files] + [
        f"--device={device}", f"--dtype={dtype}", f"--compile={device.startswith('cuda')}",
        f"--batch_size={cfg.batch_size}", f"--gradient_accumulation_steps={cfg.accum}", f"--seed={seed}",
        f"--eval_iters={cfg.eval_iters}", *(DRY_RUN if cfg.dry_run else [])])


def probe(run, evaluator):
    """Step 0's evaluation (timed), the compiling step, then PROBE_STEPS timed steps."""
    try:
        run.evaluate(evaluator)
        t0 = time.perf_counter()
        if run.cfg.compile:  # a compiler that cannot build kernels: one line with the fix, as train.py says it
            error = probe_compiled(run.model, run.cfg.batch_size, run.cfg.block_size, run.device, run.ctx)
            if error is not None:
                raise DataError(compile_failure(error))
        run.compile_s = time.perf_counter() - t0 + run.train_step()
        run.probe_s = [run.train_step() for _ in range(PROBE_STEPS)]
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise ConfigError(f"{run.label} runs out of GPU memory at micro-batch {run.cfg.batch_size} (with every run's "
                          f"weights resident): use --batch_size={max(1, run.cfg.batch_size // 2)} "
                          f"--accum={2 * run.cfg.gradient_accumulation_steps} (the same tokens per step)")
    print(f"  {run.label}: first step {run.compile_s:.1f} s (compile), then {statistics.median(run.probe_s):.3f} s "
          f"per step; evaluation {run.eval_s:.1f} s", flush=True)


# -----------------------------------------------------------------------------
# The plan: steps from the measured speed, the schedule compressed to them

@dataclass
class Plan:
    steps: int  # optimizer steps of every run
    budget_steps: int  # what the budget alone allowed (steps is less when max_steps caps it)
    eval_at: list  # steps after which every run is evaluated
    round_s: float  # estimated seconds of one round (one step of every run)
    eval_round_s: float  # estimated seconds of one evaluation of every run


def plan_steps(seconds_left, step_s, eval_s, eval_points, max_steps=0):
    """The steps every run can take in seconds_left: each round takes one step of every run (the sum of their
    step_s), and eval_points evaluations of every run (the sum of their eval_s) come on top."""
    round_s, eval_round_s = sum(step_s), sum(eval_s)
    budget_steps = max(0, int((seconds_left - eval_points * eval_round_s) / round_s))
    if budget_steps < MIN_STEPS:
        raise ConfigError(f"the budget leaves {max(0.0, seconds_left):.0f} s after compiling, time for {budget_steps} "
                          f"steps per run ({round_s:.2f} s per round of all runs, {eval_round_s:.1f} s per evaluation "
                          f"of all): at least {MIN_STEPS} are needed; raise --minutes or run fewer --variants/--seeds")
    steps = min(budget_steps, max_steps) if max_steps else budget_steps
    eval_at = sorted({max(1, round(steps * i / eval_points)) for i in range(1, eval_points + 1)})
    return Plan(steps, budget_steps, eval_at, round_s, eval_round_s)


def compressed_schedule(cfg, steps):
    """cfg's schedule shrunk from max_iters to steps, every length in proportion (warm-up 300 of 6,000 -> 5 %)."""
    scale = lambda n: max(1, round(n * steps / cfg.max_iters))
    return replace(cfg, max_iters=steps, lr_decay_iters=min(steps, scale(cfg.lr_decay_iters)),
                   warmup_iters=scale(cfg.warmup_iters), muon_momentum_warmup=scale(cfg.muon_momentum_warmup))


def train_rounds(runs, plan, evaluator, out_of_time, save=lambda: None):
    """plan.steps rounds of one step of every run, all runs evaluated after the steps of plan.eval_at. Before each
    round, out_of_time(step) may stop them all at the same step; they are evaluated there. Returns the steps taken."""
    step, t0 = 0, time.perf_counter()
    while step < plan.steps and not out_of_time(step):
        for run in runs:
            run.train_s += run.train_step()
        step += 1
        if step in plan.eval_at:
            evaluate_all(runs, evaluator, step, plan.steps, t0)
            save()
    if step not in plan.eval_at and step > 0:  # stopped by the budget: an evaluation at equal tokens
        evaluate_all(runs, evaluator, step, plan.steps, t0)
        save()
    return step


def evaluate_all(runs, evaluator, step, steps, t0):
    for run in runs:
        run.evaluate(evaluator)
    losses = " | ".join(f"{r.label} {r.evals[-1]['val_loss']:.4f}" for r in runs)
    print(f"step {step}/{steps}: val loss {losses} | {time.perf_counter() - t0:.0f} s", flush=True)


# -----------------------------------------------------------------------------
# The report

def final_rows(runs, peak):
    """One row per run: its last evaluation, the paired difference to the baseline of its seed, its speed."""
    base = {r.seed: r.evals[-1] for r in runs if r.name == "baseline"}
    rows = []
    for r in runs:
        last = r.evals[-1]
        tokens_per_s = r.iter_num * r.tokens_per_step / r.train_s if r.train_s else None
        rows.append(dict(
            name=r.name, seed=r.seed, tokens=last["tokens"], val_loss=last["val_loss"], val_bpb=last["val_bpb"],
            delta=None if r.name == "baseline" else last["val_loss"] - base[r.seed]["val_loss"],
            mid_mu=last.get(f"cond/mean_cos_l{r.n_layer // 2}"), late_mu=late_mean_cosine(last),
            spearman=last.get("cond/spearman"), tokens_per_s=tokens_per_s,
            mfu=tokens_per_s * r.flops_per_token / peak if peak and tokens_per_s else None,
            train_s=r.train_s, compile_s=r.compile_s, eval_s=r.eval_s,
            wall_s=r.compile_s + sum(r.probe_s) + r.train_s + r.eval_s))  # this run's share of the GPU time
    return rows


def tables(runs, rows, status, seconds):
    """The markdown tables (printed as they fill): results at equal tokens, val-loss curves, means over seeds."""
    final = Table("final", "Val loss, bits per byte and condensation at equal tokens; speed")
    final.set_columns(("name", "variant", "{}"), ("seed", "seed", "{}"), ("tokens", "tokens", INT),
                      ("val_loss", "val loss", "{:.4f}"), ("val_bpb", "val bpb", "{:.4f}"),
                      ("delta", "val loss - baseline (same seed)", "{:+.4f}"),
                      ("mid_mu", f"mid mu (layer {runs[0].n_layer // 2})", "{:.4f}"), ("late_mu", "late mu", "{:.4f}"),
                      ("spearman", "condensation (Spearman)", "{:+.2f}"), ("tokens_per_s", "tokens/s", INT),
                      ("mfu", "MFU", PCT), ("train_s", "train s", "{:.0f}"),
                      ("compile_s", "first step s (compile)", "{:.0f}"), ("eval_s", "evaluations s", "{:.0f}"),
                      ("wall_s", "wall s", "{:.0f}"))
    for row in rows:
        final.add(**row)
    curves = Table("curves", "Val loss at each evaluation (the same windows for every run)")
    curves.set_columns(("iter", "step", "{}"), ("tokens", "tokens", INT), *[(r.label, r.label, "{:.4f}") for r in runs])
    for i, e in enumerate(runs[0].evals):
        curves.add(iter=e["iter"], tokens=e["tokens"], **{r.label: r.evals[i]["val_loss"] for r in runs})
    found = [final, curves] + ([seed_means(rows)] if len({r.seed for r in runs}) > 1 else [])
    for table in found:
        table.status, table.seconds = status, seconds
    return found


def seed_means(rows):
    """Several seeds: per variant, mean ± sample standard deviation over seeds (differences paired by seed)."""
    means = Table("means", "Mean ± standard deviation over seeds")
    means.set_columns(("name", "variant", "{}"), ("runs", "seeds", "{}"), ("val_loss", "val loss", "{}"),
                      ("val_bpb", "val bpb", "{}"), ("delta", "val loss - baseline, paired by seed", "{}"),
                      ("late_mu", "late mu", "{}"))
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        means.add(name=name, runs=len(mine), **{k: mean_spread([r[k] for r in mine])
                                                for k in ("val_loss", "val_bpb", "delta", "late_mu")})
    return means


@dataclass
class Report:
    """What the markdown and the JSON say, filled in as the command goes."""
    argv: list
    cfg: AblationConfig
    env: dict
    start: float  # time.perf_counter() at the start
    data_note: str = ""
    train_tokens: int = 0
    evaluator: object = None
    runs: list = None
    plan: Plan = None
    left_out: list = field(default_factory=list)  # runs that failed their probe, with the cause

    def seconds(self):
        return time.perf_counter() - self.start

    def setup_lines(self):
        """The list above the tables: data, what every run did, the budget."""
        runs, plan, cfg, ev = self.runs, self.plan, self.runs[0].cfg, self.evaluator
        windows = ev.cfg.eval_iters * ev.cfg.batch_size  # the Evaluator's fixed val windows
        steps, tokens = runs[0].iter_num, runs[0].iter_num * runs[0].tokens_per_step
        lines = [
            f"- **Data:** {self.data_note}; train split {self.train_tokens:,} tokens, {tokens / self.train_tokens:.3g} "
            f"epochs per run" + (" (repeated text)." if tokens > self.train_tokens else "."),
            f"- **Runs:** {', '.join(r.label for r in runs)} (s = seed: it fixes the data order and, where the "
            f"shapes agree, the initial weights); config files: " + "; ".join(
                f"{name}: {' + '.join(VARIANTS[name])}" for name in dict.fromkeys(r.name for r in runs)) + ".",
            f"- **Steps:** {steps} of {cfg.batch_size} x {cfg.block_size} tokens x {cfg.gradient_accumulation_steps} = "
            f"{runs[0].tokens_per_step:,} tokens, {tokens:,} tokens per run, the same windows in the same order for "
            f"all; each config's schedule compressed to {plan.steps} steps (baseline: warm-up {cfg.warmup_iters}, "
            f"lr {cfg.learning_rate:g} cosine to {cfg.min_lr:g}); dtype {runs[0].cfg.dtype}, compile {cfg.compile}.",
            f"- **Evaluation:** val loss and bits per byte on the same {windows} windows of {cfg.block_size} "
            f"tokens ({windows * cfg.block_size:,} tokens); condensation on {len(ev.cond_starts)} val sequences "
            f"of {ev.cond_len} tokens: mu = mean cosine of a sequence's hidden states at a layer (layer 0 = embedding "
            f"output, i + 1 = block i's output), late mu = mu over the late half of the layers, Spearman of mu with "
            f"depth.",
            f"- **Budget:** {self.cfg.minutes:g} min, {self.seconds():.0f} s used; the measured step times allowed "
            f"{plan.budget_steps} steps per run ({plan.round_s:.2f} s per round of one step of every run)"
            + (f", capped at {self.cfg.max_steps} (max_steps)." if plan.steps < plan.budget_steps else ".")]
        if steps < plan.steps:
            lines.append(f"- **Stopped by the budget after {steps} of {plan.steps} steps** (all runs at that step).")
        lines += [f"- **Left out (failed before training):** {line}" for line in self.left_out]
        if len({r.seed for r in runs}) == 1:
            lines.append("- **One seed:** a difference smaller than the spread another seed shows is no effect "
                         "(`--seeds=2` and another --json_out measure it).")
        return lines

    def markdown(self):
        """The whole report as markdown (its tables are printed as they are built)."""
        env, steps = self.env, self.runs[0].iter_num
        status = "ok" if steps == self.plan.steps else f"stopped by the budget at step {steps} of {self.plan.steps}"
        found = tables(self.runs, final_rows(self.runs, env["peak_flops"]), status, self.seconds())
        lines = [f"### GPU ablation at 40M: {env['device_name']}, {env['date']}", "",
                 f"`python -m bench.gpu_ablation {' '.join(self.argv)}`: device {env['device']}, torch {env['torch']}"
                 + (f", peak GPU memory {env['peak_allocated_gb']:.1f} GiB." if "peak_allocated_gb" in env else ".")]
        if env["dry_run"]:
            lines.append("**Dry run: tiny models and a few steps, a check of the code paths. Not results.**")
        return "\n".join(lines + [""] + self.setup_lines() + [""] + [t.markdown() + "\n" for t in found])

    def save(self, json_out):
        """Every figure as JSON (rewritten at each evaluation: a killed command keeps what it finished)."""
        runs = [{"name": r.name, "seed": r.seed, "files": VARIANTS[r.name], "config": asdict(r.cfg),
                 "compile_s": r.compile_s, "probe_s": r.probe_s, "train_s": r.train_s, "eval_s": r.eval_s,
                 "steps": r.iter_num, "evals": r.evals} for r in self.runs]
        with open(json_out, "w") as f:
            json.dump({"environment": self.env, "config": asdict(self.cfg), "data": self.data_note,
                       "train_tokens": self.train_tokens, "plan": asdict(self.plan), "left_out": self.left_out,
                       "seconds": self.seconds(), "rows": final_rows(self.runs, self.env["peak_flops"]),
                       "runs": runs}, f, indent=1)


# -----------------------------------------------------------------------------

def environment(device, dtype, dry_run):
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device, "device_name": device_name(device),
            "torch": torch.__version__, "dtype": dtype, "compile": device.startswith("cuda"), "dry_run": dry_run,
            "peak_flops": peak_flops(device)}


def start_runs(report, names, seeds, device, dtype):
    """The data, every (variant, seed) run on the device with its initial weights, and the evaluator."""
    cfg = report.cfg
    data_dir, report.data_note = find_data(cfg)
    train_tokens, meta = open_split(data_dir, "train")
    val_tokens, _ = open_split(data_dir, "val")
    report.train_tokens = len(train_tokens)
    configs = {(name, seed): with_vocab_size(run_config(VARIANTS[name], seed, cfg, device, dtype), meta["vocab_size"])
               for seed in seeds for name in names}  # vocab_size: the data's, padded, as train.py has it
    first = configs[names[0], seeds[0]]
    # one window order per seed, shared by its variants: the same tokens in the same order
    windows = {seed: TrainWindows(train_tokens, first.block_size, seed, meta["vocab_size"]) for seed in seeds}
    report.runs = [Run(name, c, device, dtype, windows[seed]) for (name, seed), c in configs.items()]
    # no val window twice: a small val split (the sample's 381k tokens) gets fewer batches
    fits = max(1, (len(val_tokens) - 1) // (first.batch_size * first.block_size))
    eval_cfg = replace(first, eval_iters=min(first.eval_iters, fits), hellaswag_interval=0)
    report.evaluator = Evaluator(eval_cfg, val_tokens, meta["vocab_size"], Runtime(False, 0, 0, 1, device, dtype, cfg.accum),
                                 open_tokenizer(data_dir).record)


def run_ablation(report, end, json_out):
    """Probe every run, plan the steps, train them in rounds; the JSON is rewritten at every evaluation."""
    runs, evaluator, budget = report.runs, report.evaluator, 60 * report.cfg.minutes
    print(f"probe: an evaluation, a compiling step and {PROBE_STEPS} timed steps per run", flush=True)
    for run in list(runs):
        try:
            probe(run, evaluator)
        except Exception as e:  # one variant that cannot run (compiler, memory) must not cost the others the GPU
            if run.name == "baseline":  # the reference of every comparison
                raise
            traceback.print_exc()
            report.left_out.append(f"{run.label}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            runs.remove(run)
            run.release()
    report.plan = plan = plan_steps(end - MARGIN * budget - time.perf_counter(),
                                    [statistics.median(r.probe_s) for r in runs], [r.eval_s for r in runs],
                                    report.cfg.eval_points, report.cfg.max_steps)
    for run in runs:
        run.restart(compressed_schedule(run.cfg, plan.steps))
    torch.manual_seed(runs[0].seed)  # the dispersion loss's random token subsets: the same for the same command
    print(f"training: {plan.steps} steps x {len(runs)} runs of {runs[0].tokens_per_step:,} tokens, evaluated at "
          f"steps {', '.join(map(str, plan.eval_at))}; ~{plan.steps * plan.round_s:.0f} s", flush=True)

    def out_of_time(step):  # the next round, an evaluation after it when one is due, and a final one must fit
        due = plan.eval_round_s if step + 1 in plan.eval_at else 0.0
        return time.perf_counter() + plan.round_s + due + plan.eval_round_s > end

    train_rounds(runs, plan, evaluator, out_of_time, save=lambda: report.save(json_out))


def main(argv):
    cfg = parse_args(AblationConfig, argv)
    cfg = replace(cfg, **DRY_RUN_KEYS) if cfg.dry_run else cfg
    names, seeds = check(cfg)
    device = select_device("cpu" if cfg.dry_run and cfg.device == "auto" else cfg.device)
    if not (cfg.dry_run or device.startswith("cuda")):
        raise ConfigError(f"the ablation needs a CUDA GPU, and device is {device}: --dry_run checks it on a CPU")
    json_out = os.path.abspath(cfg.json_out)
    os.makedirs(os.path.dirname(json_out), exist_ok=True)  # out/ by default; an unwritable path fails now
    start = time.perf_counter()
    dtype = select_dtype("auto", device)  # bfloat16 on GPUs that have it
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    torch.backends.cudnn.allow_tf32 = True
    # every run keeps its compiled graphs in one process: more entries for the model's code than dynamo's default
    # 8, beyond which it would silently run the rest uncompiled
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(names) * len(seeds))
    report = Report(argv, cfg, environment(device, dtype, cfg.dry_run), start)
    print(f"GPU ablation on {report.env['device_name']} ({device}, {dtype}), budget {cfg.minutes:g} min"
          + (" -- DRY RUN" if cfg.dry_run else ""), flush=True)
    start_runs(report, names, seeds, device, dtype)
    run_ablation(report, start + 60 * cfg.minutes, json_out)
    if device.startswith("cuda"):
        report.env["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
    report.save(json_out)
    markdown = report.markdown()
    md_out = os.path.splitext(json_out)[0] + ".md"
    with open(md_out, "w") as f:
        f.write(markdown + "\n")
    print("\n" + "=" * 100 + "\n" + markdown + f"\n\nwrote {json_out} and {md_out}")


if __name__ == "__main__":
    run_main(main)
