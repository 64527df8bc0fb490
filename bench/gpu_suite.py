"""
Every GPU figure of BENCHMARKS.md in one command, for the rare sessions that have a GPU (issue 18):

    python -m bench.gpu_suite                               # CUDA: every part that fits in ~8 minutes
    python -m bench.gpu_suite --parts=sample,muon           # some parts only (e.g. those the first run left)
    python -m bench.gpu_suite --dry_run                     # tiny sizes on the CPU, under a minute: CI runs this
    python -m bench.gpu_suite --dry_run --device=cuda       # tiny sizes on a GPU: compile, bf16, the memory cap

The parts (PARTS below, run in this order; each a function that fills one markdown table):
  smoke            the 40M config trains SMOKE_STEPS steps on fixed random tokens: the loss must fall, and the
                   compiled model's first loss must equal the eager one's (catches a broken compiled path)
  fit_124m, fit_40m  the largest micro-batch at block 1024 under a 12 GiB cap, then tokens/s, MFU against this
                   GPU's bf16 peak, a projection to an RTX 4070 at that MFU, and peak memory at that size
  plan             the planner's predicted peak against torch.cuda.max_memory_allocated (eager), 40M and 124M
  loss_memory      124M at its micro-batch: chunked vs plain cross-entropy, activation checkpointing
  overheads        40M at its micro-batch: the dispersion loss and the learnable multipliers vs the plain model
  sample           sample.py's KV-cache generation, eager and compiled, batch 1 and 8
  muon             40M at its micro-batch: Muon vs AdamW step time (once train.py has optimizer=muon)
  fit_*_modern     the fit part for the modern-block configs with Muon (once those configs exist)
  fsdp             40M at its micro-batch in one process: plain, under DDP and under FSDP (parallel=fsdp) in a
                   process group of one, so the overhead of each wrapper alone; with more GPUs, the command for
                   the multi-GPU figures is printed (torchrun: docs/training.md)
Training parts time train.py's own train_step through bench/bench_train.py (one variant at a time, the GPU to itself,
compiled and in bf16 on a GPU, as train.py runs there).

Each part has a time budget (PARTS), checked between steps: a compile already under way finishes first. A part
that fails (out of memory or any error) prints its cause and the next part runs; its table keeps the rows it
finished. Parts stop being started once the suite's total (--total_minutes) is spent; the end of the output
then gives the command that runs the rest. Output: the tables on stdout as they fill, then all of them again as
markdown ready for BENCHMARKS.md; the same as JSON in --json_out and as markdown beside it (.md).
On a CPU nothing is compiled (inductor takes minutes per graph there) except sample's compiled rows, which
trace with torch.compile's "eager" backend so that the dry run still exercises them.
"""
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace

if not __package__:  # run as a file, the repository root is not on the path: say how to run it
    sys.exit(f"run it from the repository root as: python -m bench.{os.path.basename(__file__)[:-3]} ...")

import torch
import torch.distributed as dist

from bench.bench_plan import MAX_MICRO_BATCHES, compare
from bench.bench_train import (GB, GPT2_VOCAB, BenchConfig, Variant, bench_config, cap_memory, device_name, fits,
                               free_device_memory, largest_fitting, out_of_memory, run_alone, summarize, variant_config)
from model import GPT, GPTConfig
from smallgpt.config import model_args, parse_args
from smallgpt.device import GPU_PEAK_FLOPS, autocast, peak_flops, select_device, select_dtype
from smallgpt.errors import ConfigError, run_main
from smallgpt.generation import generate_samples
from smallgpt.plan import largest_micro_batch
from sample import SampleConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RTX_4070_FLOPS = dict(GPU_PEAK_FLOPS)["rtx 4070"]  # 58.3e12, dense bf16: the card the configs are made for
ACCUM = 8  # micro-batches per timed optimizer step (the configs use 32: shorter steps keep the parts within
           # their budgets, at the price of a 4x larger share for the optimizer's update in the step time)
TIMING = ["--warmup=3", "--steps=5", "--rounds=3"]  # per variant: untimed steps (the compile), then timed ones
SMOKE_STEPS = 300  # optimizer steps of the convergence smoke (4 x 1024 tokens each)
SMOKE_FALL = 1.0  # nats the loss must fall: learning just which of the 50,257 ids occur among the 4,096 fixed
                  # tokens takes it from ~ln(50304) = 10.8 towards ln(4096) = 8.3; a broken backward gives ~0
SMOKE_MATCH = 0.05  # nats between the compiled and the eager first-step loss: room for bf16 rounding only
SAMPLE_NEW_TOKENS, SAMPLE_PROMPT = 256, 16  # tokens generated per sample after a random prompt
MIN_PART_S = 20  # a part is not started with less than this left of the suite's total
# dry run: a tiny model and single steps, so that every part's code runs on a CPU in well under a minute
DRY_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=256", "--batch_size=2",
           "--gradient_accumulation_steps=2", "--learning_rate=1e-2", "--warmup=1", "--steps=1", "--rounds=2"]
DRY_RUN_MAX_BATCH, DRY_RUN_SMOKE_STEPS, DRY_RUN_NEW_TOKENS = 4, 40, 8


@dataclass
class SuiteConfig:
    parts: str = "all"  # all or some: smoke,fit_124m,fit_40m,plan,loss_memory,overheads,sample,muon,fit_*_modern,fsdp
    dry_run: bool = False  # tiny models, few steps: every part's code path in about a minute (on the CPU by default)
    device: str = "auto"  # 'auto' (cuda if present; the CPU in a dry run) | 'cpu' | 'cuda' | 'cuda:1'
    max_memory_gb: float = 12.0  # the fit parts' cap on this process's GPU memory: an RTX 4070 has 12 GiB
    total_minutes: float = 7.0  # no part starts after this (a compile under way may run ~1 min over: 8 in all)
    peak_flops: float = 0.0  # the GPU's dense bf16 peak FLOP/s for MFU; 0 = look it up by name
    json_out: str = "out/gpu_suite.json"  # results as JSON; the markdown goes beside it (same name, .md)


class OutOfTime(Exception):
    """A part's time budget is spent."""


class PartSkipped(Exception):
    """A part that cannot run on this code base yet (a config or key that has not landed)."""


def has_key(name):
    return name in {f.name for f in fields(BenchConfig)}


# -----------------------------------------------------------------------------
# What every part needs: the device, its settings, configs for it, and the part's deadline

class Suite:

    def __init__(self, cfg):
        self.dry_run = cfg.dry_run
        self.device = select_device("cpu" if cfg.dry_run and cfg.device == "auto" else cfg.device)
        self.cuda = self.device.startswith("cuda")
        self.dtype = select_dtype("auto", self.device)  # bfloat16 on GPUs that have it
        self.compile = self.cuda
        self.peak = peak_flops(self.device, cfg.peak_flops) or (1e12 if cfg.dry_run else None)
        self.max_memory_gb = cfg.max_memory_gb
        self.deadline = math.inf

    def out_of_time(self):
        return time.perf_counter() > self.deadline

    def check(self):
        if self.out_of_time():
            raise OutOfTime()

    def argv(self, config_file, *overrides):
        """bench/bench_train.py's command line for a config on this device: the overrides, then (dry run) the tiny sizes."""
        return [os.path.join(REPO, config_file), f"--device={self.device}", f"--dtype={self.dtype}",
                f"--compile={self.compile}", f"--peak_flops={self.peak or 0.0}", *TIMING, *overrides,
                *(DRY_RUN if self.dry_run else [])]

    def config(self, argv, variant=None):
        """The config of argv, or of argv plus one bench/bench_train.py variant (dispersion, plain_ce, key=value...)."""
        return variant_config(argv, variant) if variant else bench_config(argv)

    def measure(self, name, cfg):
        """One variant alone on the device, after a dynamo reset (many models in one process would otherwise
        reach dynamo's recompile limit, after which it silently runs them eagerly). Sets v.warmup_s: the
        untimed steps' seconds, the compile included."""
        self.check()
        torch._dynamo.reset()
        t0 = time.perf_counter()
        v = run_alone(name, cfg, self.device, self.dtype, cfg)
        v.warmup_s = time.perf_counter() - t0 - sum(v.times)
        return v

    def cap(self, gib):
        """Cap the GPU memory this process may use (fit parts); gib 0 lifts it. No-op on a CPU."""
        if self.cuda:
            cap_memory(self.device, gib)


class Table:
    """One part's results: markdown columns (key, header, format), rows of raw values, notes and a status.
    Rows and notes are printed as they come, so a part that is stopped keeps what it finished."""

    def __init__(self, name, title):
        self.name, self.title, self.columns, self.rows, self.notes = name, title, [], [], []
        self.status, self.seconds = "not run", 0.0

    def set_columns(self, *columns):
        self.columns = list(columns)
        print("\n".join(self.header()), flush=True)

    def add(self, **row):
        self.rows.append(row)
        print(self.row(row), flush=True)

    def note(self, text):
        self.notes.append(text)
        print(text, flush=True)

    def header(self):
        return ["| " + " | ".join(h for _, h, _ in self.columns) + " |", "|" + "---|" * len(self.columns)]

    def row(self, row):
        cell = lambda value, fmt: "-" if value is None else fmt.format(value) if isinstance(fmt, str) else fmt(value)
        return "| " + " | ".join(cell(row.get(key), fmt) for key, _, fmt in self.columns) + " |"

    def markdown(self):
        lines = [f"#### {self.title}", "", f"Status: {self.status} ({self.seconds:.0f} s).", ""]
        if self.columns and self.rows:
            lines += self.header() + [self.row(r) for r in self.rows] + [""]
        return "\n".join(lines + [f"- {n}" for n in self.notes])

    def as_dict(self):
        return {"name": self.name, "title": self.title, "status": self.status, "seconds": self.seconds,
                "columns": [h for _, h, _ in self.columns], "rows": self.rows, "notes": self.notes}


GIB, PCT, INT, MS = "{:.2f} GiB", "{:.1%}", "{:,.0f}", "{:.1f}"
RATIO = ("ratio", "step time vs first row (range over rounds)", lambda r: f"{r[0]:.3f} ({r[1]:.2f}-{r[2]:.2f})")
TIMING_COLUMNS = [("name", "variant", "{}"), ("batch_size", "micro-batch", "{}"), ("ms_per_step", "ms/step", MS),
                  ("tokens_per_s", "tokens/s", INT), RATIO, ("peak_mem_gb", "peak allocated", GIB),
                  ("peak_reserved_gb", "peak reserved", GIB), ("warmup_s", "warm-up s (compile)", "{:.0f}")]


def timing_row(v, base, suite):
    """bench/bench_train.py's summary of a measured variant, with the step-time ratio as one (median, low, high) value."""
    s = summarize(v, base, suite.peak, v.cfg.steps)
    if s.get("out_of_memory"):
        return {"name": f"{v.name}: out of memory", "batch_size": v.cfg.batch_size, "out_of_memory": True}
    return {**s, "ratio": (s["step_time_ratio"], *s["ratio_range"]), "warmup_s": v.warmup_s}


def time_variants(suite, table, variants):
    """Measure (name, cfg) pairs one after another, each row against the first (the base)."""
    table.set_columns(*TIMING_COLUMNS)
    base = None
    for name, cfg in variants:
        v = suite.measure(name, cfg)
        if base is None and v.oom:
            raise RuntimeError(f"{name} (the base) runs out of memory at micro-batch {cfg.batch_size}")
        base = base or v
        table.add(**timing_row(v, base, suite))
    first = variants[0][1]
    table.note(f"{first.batch_size} x {first.block_size} tokens x {first.gradient_accumulation_steps} micro-batches "
               f"per step, {first.rounds} rounds x {first.steps} timed steps; no memory cap; peak allocated is "
               f"the variant's own peak, peak reserved what the allocator held (what a cap limits)")


# -----------------------------------------------------------------------------
# The parts

def part_smoke(suite, table):
    """40M config, SMOKE_STEPS steps on the same 4 random windows (bf16 + compile on a GPU): the loss must fall
    by SMOKE_FALL, and the first step's loss must match an eager model's from the same weights."""
    cfg = suite.config(suite.argv("config/train_fineweb_40m.py", "--batch_size=4", "--gradient_accumulation_steps=1"))
    table.set_columns(("steps", "steps", "{}"), ("first", "first loss", "{:.3f}"),
                      ("eager", "eager first loss", "{:.3f}"), ("last", "mean of last 10 losses", "{:.3f}"),
                      ("ms", "ms/step (compile excluded)", MS), ("result", "result", "{}"))
    eager = Variant("eager", replace(cfg, compile=False), suite.device, suite.dtype)
    eager.step()
    eager_loss = eager.loss
    eager.release()
    v = Variant("smoke", cfg, suite.device, suite.dtype)
    losses, times, steps = [], [], DRY_RUN_SMOKE_STEPS if suite.dry_run else SMOKE_STEPS
    for step in range(steps):
        if suite.out_of_time() and step >= 20:  # judged on the steps done, once there are enough
            table.note(f"stopped by its time budget after {step} of {steps} steps")
            break
        suite.check()
        times.append(v.step()[0])  # the first one compiles
        losses.append(v.loss)
    v.release()
    last = statistics.mean(losses[-10:])
    fell, same = last < losses[0] - SMOKE_FALL, abs(losses[0] - eager_loss) < SMOKE_MATCH
    ok = all(map(math.isfinite, losses)) and fell and same
    table.add(steps=len(losses), first=losses[0], eager=eager_loss, last=last, result="pass" if ok else "FAIL",
              ms=1000 * statistics.median(times[1:] or times))
    table.note(f"{cfg.batch_size} x {cfg.block_size} tokens per step, lr {cfg.learning_rate:g} constant, dtype "
               f"{suite.dtype}, compile {cfg.compile}; pass = finite, falls by > {SMOKE_FALL} nat, first loss within "
               f"{SMOKE_MATCH} of eager")
    if not ok:
        raise AssertionError(f"convergence smoke failed: loss {losses[0]:.3f} -> {last:.3f} (must fall by "
                             f"{SMOKE_FALL}), eager first loss {eager_loss:.3f}")


FIT_COLUMNS = [("config", "config", "{}"), ("batch_size", "largest micro-batch", "{}"), ("ms_per_step", "ms/step", MS),
               ("tokens_per_s", "tokens/s", INT), ("mfu", "MFU (this GPU's bf16 peak)", PCT),
               ("rtx4070_tokens_per_s", "RTX 4070 projection: tokens/s at this MFU", INT),
               ("peak_mem_gb", "peak allocated", GIB), ("peak_reserved_gb", "peak reserved", GIB),
               ("warmup_s", "warm-up s (compile)", "{:.0f}")]


def part_fit(suite, table, config_file):
    """The largest micro-batch under the memory cap, searched eagerly, then measured compiled at that size
    (stepping down if the compiled model needs more). Eagerly, because every size is a new compile (the chunked
    loss unrolls one loop iteration per 1024 tokens into the graph): a dozen compiles would take many minutes.
    torch.compile's graphs usually save fewer activations than eager mode, so the size found may be
    conservative: the compiled run's peak memory shows the headroom that is left."""
    if not os.path.exists(os.path.join(REPO, config_file)):
        raise PartSkipped(f"{config_file} does not exist yet")
    muon = "modern" in config_file and has_key("optimizer")
    cfg = suite.config(suite.argv(config_file, f"--gradient_accumulation_steps={ACCUM}",
                                  *(["--optimizer=muon"] if muon else [])))
    label = os.path.basename(config_file) + (" + Muon" if muon else "")
    table.set_columns(*FIT_COLUMNS)
    if suite.cuda:
        free, total = torch.cuda.mem_get_info(suite.device)
        if free < suite.max_memory_gb * GB:
            table.note(f"only {free / GB:.1f} of {total / GB:.1f} GiB free: the search is limited by the card")
    suite.cap(suite.max_memory_gb)
    try:
        def trial(batch):
            suite.check()
            return fits(label, replace(cfg, compile=False), batch, suite.device, suite.dtype)
        best = largest_fitting(trial, limit=DRY_RUN_MAX_BATCH if suite.dry_run else 512)
        v = None
        while best > 0:
            v = suite.measure(label, replace(cfg, batch_size=best))
            if not v.oom:
                break
            best -= 1  # the compiled model needed more than the eager one
        if best == 0:
            raise RuntimeError(f"not even a micro-batch of 1 fits under {suite.max_memory_gb:g} GiB")
    finally:
        suite.cap(0)
    row = timing_row(v, v, suite)
    projection = row["mfu"] * RTX_4070_FLOPS / v.flops_per_token if row["mfu"] is not None else None
    table.add(config=label, rtx4070_tokens_per_s=projection, **row)
    cap = (f"cap {suite.max_memory_gb:g} GiB (set_per_process_memory_fraction; a real 12 GB card also holds the "
           f"CUDA context)" if suite.cuda else "no cap on a CPU")
    table.note(f"block {cfg.block_size}, {cfg.gradient_accumulation_steps} micro-batches per step, {cap}; largest "
               f"micro-batch searched eagerly, then timed at that size with compile {cfg.compile}; MFU by the "
               f"PaLM formula, {v.flops_per_token / 1e6:,.1f} MFLOPs per token; the RTX 4070 column is a projection "
               f"({RTX_4070_FLOPS / 1e12:.1f} TFLOP/s x this MFU), not a measurement")


def part_loss_memory(suite, table):
    """124M at its micro-batch: chunked cross-entropy (the default) vs plain, and activation checkpointing."""
    argv = suite.argv("config/train_fineweb.py", f"--gradient_accumulation_steps={ACCUM}")
    time_variants(suite, table, [("chunked CE, 1024-token chunks", suite.config(argv)),
                                 ("plain CE (loss_chunk_size=0)", suite.config(argv, "plain_ce")),
                                 ("activation checkpointing", suite.config(argv, "checkpointing"))])


def part_overheads(suite, table):
    """40M at its micro-batch: the research features' step-time overhead."""
    argv = suite.argv("config/train_fineweb_40m.py", f"--gradient_accumulation_steps={ACCUM}")
    time_variants(suite, table, [("plain model", suite.config(argv)),
                                 ("dispersion (config/ablate_dispersion.py)", suite.config(argv, "dispersion")),
                                 ("multipliers (config/ablate_multipliers.py)", suite.config(argv, "multipliers"))])


def part_muon(suite, table):
    """40M at its micro-batch: Muon's step time against AdamW's."""
    if not has_key("optimizer"):
        raise PartSkipped("train.py has no optimizer key yet (Muon has not landed)")
    argv = suite.argv("config/train_fineweb_40m.py", f"--gradient_accumulation_steps={ACCUM}", "--optimizer=adamw")
    time_variants(suite, table, [("AdamW", suite.config(argv)), ("Muon", suite.config(argv, "optimizer=muon"))])


def part_fsdp(suite, table):
    """40M at its micro-batch: one process as train.py runs it without torchrun, then the same step under DDP and
    under FSDP in a process group of this process alone (world size 1): no other GPU to talk to, so what remains
    is each wrapper's own cost (FSDP: its all-gather and reduce-scatter calls, the copies into and out of their
    buffers, the bf16 weights it gathers; DDP: its gradient buckets)."""
    argv = suite.argv("config/train_fineweb_40m.py", f"--gradient_accumulation_steps={ACCUM}")
    variants = [("one process", suite.config(argv)), ("DDP, 1 process", suite.config(argv, "parallel=ddp")),
                ("FSDP, 1 process", suite.config(argv, "parallel=fsdp"))]
    table.set_columns(*TIMING_COLUMNS)
    base = suite.measure(*variants[0])
    table.add(**timing_row(base, base, suite))
    if suite.cuda:
        torch.cuda.set_device(suite.device)  # NCCL and FSDP's device mesh use the current device
    dist.init_process_group("nccl" if suite.cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for name, cfg in variants[1:]:
            table.add(**timing_row(suite.measure(name, cfg), base, suite))
    finally:
        dist.destroy_process_group()
    table.note(f"{base.cfg.batch_size} x {base.cfg.block_size} tokens x {base.cfg.gradient_accumulation_steps} "
               f"micro-batches per step (DDP and FSDP synchronise on the last), {base.cfg.rounds} rounds x "
               f"{base.cfg.steps} timed steps; with {suite.dtype} the FSDP row "
               + ("gathers bf16 weights and reduces gradients in float32 where the others autocast (docs/training.md)"
                  if suite.dtype != "float32" else "computes what the others compute"))
    gpus = torch.cuda.device_count() if suite.cuda else 1
    if gpus > 1:
        table.note(f"{gpus} GPUs here: time DDP and FSDP across them with `torchrun --standalone "
                   f"--nproc_per_node={gpus} train.py config/train_fineweb_40m.py --parallel=fsdp --max_iters=50` "
                   f"(and --parallel=ddp)")


def part_sample(suite, table):
    """sample.py's generation (generation.generate_samples: KV cache, top-k sampling) on the 40M architecture,
    random weights, under autocast, eager and compiled as `sample.py --compile` compiles it, batch 1 and 8."""
    cfg = suite.config(suite.argv("config/train_fineweb_40m.py"))
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**model_args(cfg))).to(suite.device).eval()
    vocab = min(cfg.vocab_size, GPT2_VOCAB)
    prompt = torch.randint(vocab, (4 if suite.dry_run else SAMPLE_PROMPT,)).tolist()
    new = DRY_RUN_NEW_TOKENS if suite.dry_run else SAMPLE_NEW_TOKENS
    table.set_columns(("mode", "mode", "{}"), ("batch", "batch", "{}"), ("tokens_per_s", "tokens/s (all samples)", MS),
                      ("first_s", "first call s (compiles)", "{:.1f}"))
    torch._dynamo.utils.counters.clear()
    for mode in ("eager", "compiled"):
        if mode == "compiled":  # as generation.load_model for sample.py --compile; no inductor on a CPU (docstring)
            model.hidden_states = torch.compile(model.hidden_states, backend="inductor" if suite.cuda else "eager")
        for batch in (1, 8):
            suite.check()
            scfg = SampleConfig(num_samples=batch, max_new_tokens=new)  # no stop token: always `new` tokens
            first, _ = timed_generation(model, prompt, scfg, vocab, suite)
            seconds, tokens = timed_generation(model, prompt, scfg, vocab, suite)
            table.add(mode=mode, batch=batch, tokens_per_s=tokens / seconds, first_s=first)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    table.note(f"prompt {len(prompt)} tokens, {new} new tokens per sample, temperature {scfg.temperature:g}, top-k "
               f"{scfg.top_k}, dtype "
               f"{suite.dtype}; tokens/s counts every sample and includes the prefill, as sample.py prints it; "
               f"torch.compile built {graphs} graph(s) for generation (many = a recompile per step)")


PLAN_CONFIGS = ("config/train_fineweb_40m.py", "config/train_fineweb_40m_modern.py", "config/train_fineweb.py",
                "config/train_fineweb_124m_modern.py")


def part_plan(suite, table):
    """The planner (`train.py --plan`, smallgpt/plan.py) against the real peak of a training step at each config's
    micro-batch, eager as the planner models it: torch.cuda.max_memory_allocated on a GPU (on a CPU, in the dry run,
    the live tensor bytes bench/bench_plan.py counts), and each category's bytes (bench_plan.compare)."""
    table.set_columns(("config", "config", "{}"), ("batch_size", "micro-batch", "{}"),
                      ("planned_gb", "planned peak", GIB), ("measured_gb", "measured peak", GIB),
                      ("ratio", "planned / measured", "{:.3f}"), ("state_ratio", "weights + state, ratio", "{:.3f}"),
                      ("saved_ratio", "saved activations, ratio", "{:.3f}"), ("where", "planned peak at", "{}"),
                      ("largest", "largest micro-batch under the cap, planned", "{}"))
    for config_file in PLAN_CONFIGS:
        suite.check()
        cfg = suite.config(suite.argv(config_file, f"--gradient_accumulation_steps={MAX_MICRO_BATCHES}", "--compile=False"))
        try:
            rows, where, _, _ = compare(cfg)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            table.add(config=f"{os.path.basename(config_file)}: out of memory", batch_size=cfg.batch_size)
            continue
        finally:
            free_device_memory()
        got = {what: (planned, measured) for what, planned, measured in rows}
        state = [sum(got[k][i] for k in ("weights", "optimizer state")) for i in (0, 1)]
        total = got["step peak, max_memory_allocated"] if suite.cuda else \
            [state[i] + got["step peak above weights + state"][i] for i in (0, 1)]
        largest = largest_micro_batch(cfg, suite.max_memory_gb * GB, cfg.activation_checkpointing)
        table.add(config=os.path.basename(config_file), batch_size=cfg.batch_size, planned_gb=total[0] / GB,
                  measured_gb=total[1] / GB, ratio=total[0] / total[1], state_ratio=state[0] / state[1],
                  saved_ratio=got["saved by micro-batch 1"][0] / got["saved by micro-batch 1"][1], where=where,
                  largest=largest)
    table.note(f"eager (the planner's scope: torch.compile usually keeps less), {MAX_MICRO_BATCHES} micro-batches "
               f"per step, the second step measured; measured peak: "
               + ("torch.cuda.max_memory_allocated (no CUDA context, no allocator caching: the plan's allowance "
                  "covers those)" if suite.cuda else "live tensor bytes (bench/bench_plan.py's LiveTensors), no GPU")
               + f"; largest micro-batch: the plan's verdict for {suite.max_memory_gb:g} GiB, allowance included")


def timed_generation(model, prompt, scfg, vocab, suite):
    """Seconds for one generate_samples call (each step reads its tokens, so the device is done at the end)."""
    t0 = time.perf_counter()
    with autocast(suite.device, suite.dtype):
        _, tokens = generate_samples(model, prompt, scfg, vocab)
    return time.perf_counter() - t0, tokens


PARTS = [  # name, title, function, its arguments, time budget in seconds. The budgets are guesses (no GPU has
    # run the suite yet, and compiling dominates them): adjust them after the first GPU run.
    ("smoke", "Convergence smoke: 40M, fixed random tokens", part_smoke, (), 90),
    ("fit_124m", "Largest micro-batch under 12 GiB: 124M", part_fit, ("config/train_fineweb.py",), 120),
    ("fit_40m", "Largest micro-batch under 12 GiB: 40M", part_fit, ("config/train_fineweb_40m.py",), 100),
    ("plan", "The planner against torch.cuda.max_memory_allocated: 40M and 124M, GPT-2 and modern", part_plan, (), 90),
    ("loss_memory", "Chunked vs plain cross-entropy, activation checkpointing: 124M", part_loss_memory, (), 150),
    ("overheads", "Dispersion and multipliers overhead: 40M", part_overheads, (), 120),
    ("sample", "sample.py tokens/s with the KV cache: 40M", part_sample, (), 90),
    ("muon", "Muon vs AdamW step time: 40M", part_muon, (), 90),
    ("fit_40m_modern", "Largest micro-batch under 12 GiB: 40M modern (+ Muon once it exists)", part_fit,
     ("config/train_fineweb_40m_modern.py",), 100),
    ("fit_124m_modern", "Largest micro-batch under 12 GiB: 124M modern (+ Muon once it exists)", part_fit,
     ("config/train_fineweb_124m_modern.py",), 120),
    ("fsdp", "FSDP and DDP in one process (world size 1) vs no wrapper: 40M", part_fsdp, (), 120),
]


# -----------------------------------------------------------------------------
# Running the parts

def run_part(suite, name, title, fn, args, budget):
    """One part under its budget. Any failure becomes its status (the cause printed) and the suite goes on."""
    table = Table(name, title)
    print(f"\n### {name}: {title} (budget {budget:.0f} s)", flush=True)
    t0 = time.perf_counter()
    suite.deadline = t0 + budget
    try:
        fn(suite, table, *args)
        table.status = "ok"
    except PartSkipped as e:
        table.status = f"skipped: {e}"
    except OutOfTime:
        table.status = f"stopped: its {budget:.0f} s budget was spent (rows above are complete)"
    except Exception as e:  # one part's failure must not cost the others their GPU time
        traceback.print_exc()
        cause = "out of memory" if out_of_memory(e) else type(e).__name__
        table.status = f"FAILED: {cause}: {(str(e).splitlines() or [''])[0][:300]}"
    finally:
        suite.deadline = math.inf
        torch._dynamo.reset()
        free_device_memory()  # the exception and its frames are gone by now, so their tensors are freed too
    table.seconds = time.perf_counter() - t0
    print(f"status: {table.status} ({table.seconds:.0f} s)", flush=True)
    return table


def run_parts(suite, parts, total_s, save=lambda tables, not_run: None):
    """Run the parts in order; once the suite's total time is spent, the rest are listed, not started.
    save(tables, not_run) after each part: a run killed from outside keeps what it finished."""
    end = time.perf_counter() + total_s
    tables, not_run = [], []
    for i, (name, title, fn, args, budget) in enumerate(parts):
        left = end - time.perf_counter()
        if left < MIN_PART_S:
            not_run.append(name)
            continue
        tables.append(run_part(suite, name, title, fn, args, min(budget, left)))
        save(tables, not_run + [p[0] for p in parts[i + 1:]])
    return tables, not_run


def environment(suite):
    """The machine and settings, for the report's first line and the JSON."""
    env = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": suite.device, "device_name": device_name(suite.device),
           "torch": torch.__version__, "dtype": suite.dtype, "compile": suite.compile, "dry_run": suite.dry_run,
           "peak_flops": suite.peak, "rtx4070_peak_flops": RTX_4070_FLOPS, "max_memory_gb": suite.max_memory_gb}
    if suite.cuda:
        free, total = torch.cuda.mem_get_info(suite.device)  # other processes' memory shows up here
        env.update(gpu_free_gb=free / GB, gpu_total_gb=total / GB)
    return env


def targets(tables):
    """The issue's targets for the 124M config, against the fit_124m row (when it ran)."""
    row = next((t.rows[0] for t in tables if t.name == "fit_124m" and t.rows), None)
    if row is None:
        return []
    verdict = lambda ok: "met" if ok else "NOT met"
    lines = ["Targets (124M, chunked loss, no checkpointing):", "",
             f"- fits 12 GiB at micro-batch >= 16: largest {row['batch_size']}, {verdict(row['batch_size'] >= 16)}"]
    if row["mfu"] is not None:
        lines.append(f"- MFU >= 50 % of the bf16 peak: {row['mfu']:.1%}, {verdict(row['mfu'] >= 0.5)}")
    return lines + [""]


def report(env, tables, not_run, argv):
    """All tables as one markdown document."""
    mem = f", {env['gpu_free_gb']:.1f} of {env['gpu_total_gb']:.1f} GiB free at start" if "gpu_total_gb" in env else ""
    lines = [f"### GPU suite: {env['device_name']}, {env['date']}", "",
             f"`python -m bench.gpu_suite {' '.join(argv)}`: device {env['device']}, {env['dtype']}, compile "
             f"{env['compile']}, torch {env['torch']}{mem}."]
    if env["dry_run"]:
        lines.append("**Dry run: tiny models and single steps, a check of the code paths. Not benchmark figures.**")
    lines += [""] + targets(tables) + [t.markdown() + "\n" for t in tables]
    if not_run:
        lines.append(f"Not run (yet, or the suite's time was spent): {', '.join(not_run)}. Run them with "
                     f"`python -m bench.gpu_suite --parts={','.join(not_run)}` and another --json_out (the same one "
                     f"would be overwritten).")
    return "\n".join(lines)


def main(argv):
    cfg = parse_args(SuiteConfig, argv)
    names = [p[0] for p in PARTS]
    chosen = names if cfg.parts == "all" else cfg.parts.split(",")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ConfigError(f"unknown part {unknown[0]!r} in --parts: use {', '.join(names)} or all")
    if cfg.max_memory_gb <= 0 or cfg.total_minutes <= 0:
        raise ConfigError("max_memory_gb and total_minutes must be positive")
    suite = Suite(cfg)
    json_out = os.path.abspath(cfg.json_out)
    os.makedirs(os.path.dirname(json_out), exist_ok=True)  # out/ by default; an unwritable path fails now
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    torch.backends.cudnn.allow_tf32 = True
    env = environment(suite)
    print(f"GPU suite on {env['device_name']} ({suite.device}, {suite.dtype}, compile {suite.compile}), "
          f"torch {env['torch']}" + (" -- DRY RUN" if suite.dry_run else ""), flush=True)

    md_out = os.path.splitext(json_out)[0] + ".md"

    def save(tables, not_run):
        with open(json_out, "w") as f:
            json.dump({"environment": env, "config": asdict(cfg), "parts": [t.as_dict() for t in tables],
                       "not_run": not_run}, f, indent=1)
        with open(md_out, "w") as f:
            f.write(report(env, tables, not_run, argv) + "\n")

    tables, not_run = run_parts(suite, [p for p in PARTS if p[0] in chosen], 60 * cfg.total_minutes, save)
    save(tables, not_run)
    print("\n" + "=" * 100 + "\n" + report(env, tables, not_run, argv))
    print(f"\nwrote {json_out} and {md_out}")


if __name__ == "__main__":
    run_main(main)
