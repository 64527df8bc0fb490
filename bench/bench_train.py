"""
Training throughput and memory of any train.py config, measured with train.py's own train_step (same model,
optimizer, autocast, torch.compile, gradient accumulation) on random tokens: the speed does not depend on them.

    python -m bench.bench_train config/train_tiny.py                                           # seconds on a CPU
    python -m bench.bench_train config/train_fineweb_40m.py --batch_size=1 --gradient_accumulation_steps=1 --compile=False \
        --compare=dispersion,multipliers,both                                     # feature overheads on a CPU
    python -m bench.bench_train config/train_fineweb.py --max_memory_gb=12 --find_max_batch    # GPU: what fits a 12 GB card

Every train.py key works (config files, then --key=value), plus the bench keys at the end of BenchConfig.
`--compare` adds variants to the config as given ("base"): a name from VARIANTS, an overlay config file, or
one key=value. Variants take turns (base, A, B, base, A, B, ...) over several rounds, so noise from a shared
machine hits them alike; the table gives median ms per optimizer step, tokens/s, the step-time ratio to base
(median and range over rounds of each round's ratio), model TFLOP/s, MFU (when the device's peak is known or
--peak_flops is set) and peak memory: on CUDA each variant's own peak allocation, on CPU the whole process's
peak RSS (one figure: to compare the memory of two settings on a CPU, run them as two processes). On a CPU
shared with other jobs, OMP_NUM_THREADS=1 avoids threads stalling on each other and steadies the ratios.
bench/gpu_suite.py runs every GPU measurement of BENCHMARKS.md with these pieces in one command.
"""
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

if not __package__:  # run as a file, the repository root is not on the path: say how to run it
    sys.exit(f"run it from the repository root as: python -m bench.{os.path.basename(__file__)[:-3]} ...")

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from smallgpt.config import TrainConfig, parse_args, validate, with_vocab_size
from smallgpt.device import autocast, peak_flops, select_device, select_dtype, to_device
from smallgpt.errors import ConfigError, run_main
from smallgpt.monitor import Health
from smallgpt.optim import configure_optimizer
from smallgpt.parallel import shard_model
from train import Runtime, SkipGate, build_model, distribute, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name -> the overlay (config files and --key=value) that turns it on, applied after the command line
    "dispersion": ["config/ablate_dispersion.py"],
    "multipliers": ["config/ablate_multipliers.py"],
    "both": ["config/ablate_both.py"],
    "plain_ce": ["--loss_chunk_size=0"],  # cross-entropy on the full float32 logits
    "checkpointing": ["--activation_checkpointing=True"],
    "muon": ["--optimizer=muon"],  # Muon on the blocks' matrices (Newton-Schulz every step) instead of AdamW
    "skip": ["--spike_action=skip"],  # the step's numbers read before the update (to drop an outlier's), not after
}
GB = 2 ** 30  # memory figures are in GiB (an "RTX 4070 12 GB" has 12 GiB)
GPT2_VOCAB = 50257  # the batches are random ids of GPT-2's vocabulary


@dataclass
class BenchConfig(TrainConfig):
    # --- bench_train.py only
    compare: str = ""  # variants vs base, comma-separated: dispersion|multipliers|both|plain_ce|checkpointing|muon|skip|a file|key=value
    warmup: int = 2  # untimed optimizer steps per variant first (torch.compile compiles during the first)
    steps: int = 3  # timed optimizer steps per variant in each round
    rounds: int = 3  # rounds; the variants take turns in each, so machine noise hits all of them alike
    max_memory_gb: float = 0.0  # CUDA: cap this process's GPU memory, e.g. 12 to emulate an RTX 4070; 0 = no cap
    find_max_batch: bool = False  # CUDA: first search each variant's largest micro-batch that fits, then bench at it
    json_out: str = ""  # also write the results to this JSON file


def variant_config(argv, item):
    """The config of one --compare item: the command line, then the item's overlay on top."""
    if item in VARIANTS:
        overlay = [a if a.startswith("--") else os.path.join(REPO, a) for a in VARIANTS[item]]
    elif os.path.isfile(item):
        overlay = [item]
    elif "=" in item:
        overlay = [f"--{item}"]
    else:
        raise ConfigError(f"unknown variant {item!r} in --compare: use {', '.join(VARIANTS)}, a config file or key=value")
    return bench_config(list(argv) + overlay)


def bench_config(argv):
    """A BenchConfig, checked; vocab_size 0 = GPT-2's vocabulary padded, as train.py makes it for GPT-2 tokens (a
    smaller one is kept: the batches are random ids below it)."""
    cfg = validate(parse_args(BenchConfig, argv))
    return with_vocab_size(cfg, GPT2_VOCAB) if cfg.vocab_size == 0 else cfg


# -----------------------------------------------------------------------------
# One variant: a model and its optimizer on the device, stepped by train.py's train_step

class Variant:
    """Under a process group (bench/gpu_suite.py's group of one process) the model is shared as train.py shares it
    under torchrun: DDP, or sharded with parallel=fsdp."""

    def __init__(self, name, cfg, device, dtype):
        self.name, self.cfg, self.device = name, cfg, device
        device_type = device.split(":")[0]
        torch.manual_seed(cfg.seed)  # every variant starts from the same weights where their shapes agree
        index = torch.device(device).index or 0  # the GPU, for DDP's device_ids
        rt = Runtime(True, 0, index, 1, device, dtype, cfg.gradient_accumulation_steps, cfg.parallel == "fsdp") \
            if dist.is_initialized() else None
        self.raw_model = build_model(cfg, None)
        self.raw_model = shard_model(self.raw_model, device, dtype) if rt and rt.fsdp else self.raw_model.to(device)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.optimizer = configure_optimizer(self.raw_model, cfg, device_type)
        self.model, self.no_sync = distribute(cfg, rt, self.raw_model, self.model) if rt else (self.model, None)
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
        self.ctx = autocast(device, dtype)
        self.clip_params = self.raw_model.parameters_to_clip()
        gen = torch.Generator().manual_seed(cfg.seed)
        vocab = min(cfg.vocab_size, GPT2_VOCAB)  # real GPT-2 ids only, like the token files
        self.windows = [torch.randint(vocab, (cfg.batch_size, cfg.block_size + 1), generator=gen)
                        for _ in range(cfg.gradient_accumulation_steps)]
        self.flops_per_token, self.params = self.raw_model.flops_per_token(), self.raw_model.num_params()
        self.times, self.cpu_times, self.peak_bytes, self.peak_reserved, self.oom = [], [], 0, 0, False
        self.loss = None  # mean cross-entropy of the last step
        # spike_action='skip': train.py's gate, which reads the step's numbers before the update instead of after
        self.health = Health(cfg.loss_spike_factor, cfg.grad_spike_factor) if cfg.spike_action == "skip" else None

    def get_batch(self, micro):  # as train.py's: CPU windows, copied (pinned, on CUDA) to the device
        w = self.windows[micro]
        return to_device(w[:, :-1], self.device), to_device(w[:, 1:], self.device)

    def step(self):
        """One optimizer step; returns its wall-clock and this process's CPU seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        accum = self.cfg.gradient_accumulation_steps
        read = lambda sums, norm: (sums.tolist()[0] / accum, 0.0, norm.item(), False)  # waits for the device
        gate = SkipGate(self.health, 0, self.scaler.is_enabled(), read) if self.health else None
        sums, norm = train_step(self.model, self.optimizer, self.scaler, self.ctx, self.get_batch, accum,
                                self.clip_params, self.cfg.grad_clip, self.no_sync, gate)
        self.loss = (gate.numbers if gate else read(sums, norm))[0]  # one wait per step, as in train.py
        return time.perf_counter() - t0, time.process_time() - c0

    def resident_bytes(self):
        """Device memory this variant holds between steps: weights and optimizer state (gradients are freed)."""
        tensors = list(self.raw_model.parameters()) + [v for state in self.optimizer.state.values()
                                                       for v in state.values() if torch.is_tensor(v)]
        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]  # FSDP: this process's shards
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")

    def timed_steps(self, n):
        """n timed steps; on CUDA also this variant's own peak allocation (minus what other variants hold)."""
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            others = torch.cuda.memory_allocated() - self.resident_bytes()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(n):
            wall, cpu = self.step()
            self.times.append(wall)
            self.cpu_times.append(cpu)
        if cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated() - others)
            self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())  # what a cap limits

    def release(self):
        """Free the device memory, keep the figures."""
        self.model = self.raw_model = self.optimizer = self.clip_params = self.windows = self.no_sync = None
        free_device_memory()


def cap_memory(device, gib):
    """Cap this process's CUDA caching allocator at gib GiB (0 = no cap): beyond it an allocation raises
    OutOfMemoryError, as on a card that small (a real card's CUDA context takes a few hundred MB on top)."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GB / total) if gib else 1.0, device)


def free_device_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# The largest micro-batch that fits (CUDA)

def largest_fitting(fits, limit=512):
    """The largest b in 1..limit with fits(b), for a fits that holds up to some size and fails beyond it:
    doubles from 1 until a failure, then bisects. 0 if even 1 does not fit."""
    good, bad = 0, None
    b = 1
    while b <= limit:
        if not fits(b):
            bad = b
            break
        good, b = b, 2 * b
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def out_of_memory(e):
    # compiled kernels can re-raise a CUDA OOM as a plain RuntimeError
    return isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, RuntimeError) and "out of memory" in str(e)


def fits(name, cfg, batch_size, device, dtype):
    """Whether a fresh model trains at this micro-batch: warm-up steps with two micro-batches, so that the
    peak holds the accumulated gradients and the AdamW state, as in training."""
    trial = replace(cfg, batch_size=batch_size, gradient_accumulation_steps=min(2, cfg.gradient_accumulation_steps))
    variant = None
    try:
        variant = Variant(name, trial, device, dtype)
        for _ in range(max(2, cfg.warmup)):
            variant.step()
        ok = True
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        ok = False
    if variant is not None:
        variant.release()
    torch._dynamo.reset()  # each trial compiles afresh, as a real run at that batch size would
    print(f"  {name}: micro-batch {batch_size:4d} {'fits' if ok else 'does not fit'}", flush=True)
    return ok


# -----------------------------------------------------------------------------
# Measure and report

def warm_up(v, steps):
    """Untimed steps; a variant that runs out of device memory is released and reported as such."""
    try:
        for _ in range(steps):
            v.step()
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        v.oom = True
        v.release()
    return v


def run(variants, device, dtype, cfg):
    """Warm up and time every (name, cfg) in variants: all resident, taking turns in each round; or, with
    find_max_batch (each variant at its own memory limit), one at a time with the device to itself."""
    if cfg.find_max_batch:
        return [run_alone(name, vcfg, device, dtype, cfg) for name, vcfg in variants]
    done = [warm_up(Variant(name, vcfg, device, dtype), cfg.warmup) for name, vcfg in variants]
    for _ in range(cfg.rounds):
        for v in done:
            if not v.oom:
                v.timed_steps(cfg.steps)
    return done


def run_alone(name, vcfg, device, dtype, cfg):
    """One variant with the device to itself: warm up, cfg.rounds x cfg.steps timed steps, release."""
    v = warm_up(Variant(name, vcfg, device, dtype), cfg.warmup)
    for _ in range(0 if v.oom else cfg.rounds):
        v.timed_steps(cfg.steps)
    v.release()
    return v


def round_ratios(times, base_times, steps):
    """Median step time of each round over base's in the same round: robust to a load that drifts."""
    return [statistics.median(times[i:i + steps]) / statistics.median(base_times[i:i + steps])
            for i in range(0, len(times), steps)]


def summarize(v, base, flops_peak, steps):
    """One variant's figures; ratios to base are medians over the rounds of that round's ratio."""
    cfg = v.cfg
    if v.oom:
        return {"name": v.name, "batch_size": cfg.batch_size, "out_of_memory": True}
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    seconds = statistics.median(v.times)
    ratios = round_ratios(v.times, base.times, steps)
    flops = v.flops_per_token * tokens / seconds  # model FLOP/s, PaLM's formula (dispersion's extra work not counted)
    cuda = v.device.startswith("cuda")
    return {"name": v.name, "params": v.params, "batch_size": cfg.batch_size, "accum": cfg.gradient_accumulation_steps,
            "block_size": cfg.block_size, "tokens_per_step": tokens, "ms_per_step": 1000 * seconds,
            "tokens_per_s": tokens / seconds, "step_time_ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "model_tflops": flops / 1e12,
            # this process's CPU seconds: on a shared CPU, less sensitive to other jobs than wall-clock time
            "cpu_time_ratio": None if cuda else statistics.median(round_ratios(v.cpu_times, base.cpu_times, steps)),
            "mfu": flops / flops_peak if flops_peak else None,
            "peak_mem_gb": v.peak_bytes / GB if cuda else None, "peak_reserved_gb": v.peak_reserved / GB if cuda else None}


def print_table(rows):
    print(f"{'variant':<16} | {'batch':>5} | {'ms/step':>9} | {'tok/s':>9} | {'time vs base (range)':>20} | "
          f"{'cpu vs base':>11} | {'TFLOP/s':>7} | {'MFU':>6} | {'peak mem':>9}")
    for r in rows:
        if r.get("out_of_memory"):
            print(f"{r['name']:<16} | {r['batch_size']:5d} | out of device memory")
            continue
        ratio = f"{r['step_time_ratio']:.3f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gb']:.2f} GiB" if r["peak_mem_gb"] is not None else "-"
        cpu = f"{r['cpu_time_ratio']:.3f}" if r["cpu_time_ratio"] is not None else "-"
        print(f"{r['name']:<16} | {r['batch_size']:5d} | {r['ms_per_step']:9.1f} | {r['tokens_per_s']:9,.0f} | "
              f"{ratio:>20} | {cpu:>11} | {r['model_tflops']:7.3f} | {mfu:>6} | {mem:>9}")


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def main(argv):
    cfg = bench_config(argv)
    if cfg.warmup < 0 or cfg.steps < 1 or cfg.rounds < 1:
        raise ConfigError("bench needs warmup >= 0, steps >= 1 and rounds >= 1")
    if cfg.batch_size == "auto":
        raise ConfigError("bench_train measures a given micro-batch: set batch_size to a number (or --find_max_batch)")
    if cfg.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.json_out))):
        raise ConfigError(f"json_out {cfg.json_out!r}: no such directory")  # found now, not after the benchmark
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    cuda = device.startswith("cuda")
    if (cfg.max_memory_gb or cfg.find_max_batch) and not cuda:
        raise ConfigError(f"max_memory_gb and find_max_batch need a CUDA device (device is {device})")
    variants = [("base", cfg)] + [(item, variant_config(argv, item)) for item in cfg.compare.split(",") if item]
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    torch.backends.cudnn.allow_tf32 = True
    if cfg.max_memory_gb:
        cap_memory(device, cfg.max_memory_gb)
    print(f"device {device} ({device_name(device)}), dtype {dtype}, compile {cfg.compile}, torch {torch.__version__}"
          + (f", memory capped at {cfg.max_memory_gb:g} GiB" if cfg.max_memory_gb else ""))

    if cfg.find_max_batch:
        print("largest micro-batch of each variant (a fresh model per try, 2 micro-batches per step):")
        for i, (name, vcfg) in enumerate(variants):
            best = largest_fitting(lambda b: fits(name, vcfg, b, device, dtype))
            if best == 0:
                raise ConfigError(f"{name}: not even a micro-batch of 1 fits")
            variants[i] = (name, replace(vcfg, batch_size=best))
    for name, vcfg in variants:
        print(f"{name}: {vcfg.batch_size} batch x {vcfg.block_size} block x {vcfg.gradient_accumulation_steps} accum "
              f"= {vcfg.batch_size * vcfg.block_size * vcfg.gradient_accumulation_steps:,} tokens per step")
    print(f"{cfg.warmup} warm-up step(s) per variant, then {cfg.rounds} round(s) x {cfg.steps} timed step(s)"
          + (", one variant at a time" if cfg.find_max_batch else ", variants taking turns"), flush=True)

    measured = run(variants, device, dtype, cfg)
    if measured[0].oom:
        raise ConfigError(f"base runs out of device memory at micro-batch {cfg.batch_size}: try a smaller batch_size")
    flops_peak = peak_flops(device, cfg.peak_flops)
    rows = [summarize(v, measured[0], flops_peak, cfg.steps) for v in measured]
    print(f"model: {rows[0]['params'] / 1e6:.2f}M parameters (position embeddings not counted), "
          f"{measured[0].flops_per_token / 1e6:.0f} MFLOPs per token"
          + ("" if flops_peak else "; MFU not reported: unknown peak FLOP/s (set --peak_flops)"))
    print_table(rows)
    result = {"argv": list(argv), "date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
              "device_name": device_name(device), "dtype": dtype, "compile": cfg.compile, "torch": torch.__version__,
              "peak_flops": flops_peak, "max_memory_gb": cfg.max_memory_gb, "variants": rows,
              # ru_maxrss is in KiB on Linux: the high-water mark of the whole process, all variants together
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}
    print(f"peak RSS of this process (host memory, all variants together): {result['peak_rss_gb']:.2f} GiB")
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump({**result, "config": asdict(cfg)}, f, indent=1)


if __name__ == "__main__":
    run_main(main)
