"""
Train a GPT on token files from data/fineweb/prepare.py. One loop: bf16 autocast, torch.compile, fused
AdamW, gradient accumulation, exact resume, and the same script under torchrun for several GPUs.

    python train.py config/train_tiny.py                       # a minute on a CPU
    python train.py config/train_fineweb_40m.py --batch_size=8  # a config file plus overrides
    python train.py config/train_tiny.py --init_from=resume     # continue exactly where last.pt stopped
    torchrun --standalone --nproc_per_node=4 train.py config/train_fineweb.py
    torchrun --standalone --nproc_per_node=4 train.py config/train_fineweb_1b_fsdp.py  # FSDP: too big for one card

Writes to out_dir: last.pt and best.pt (best val loss), metrics.jsonl, config.json, and with lr_schedule='wsd'
stable.pt when the decay starts (extend a finished run from it: docs/monitoring.md). With parallel='fsdp' the
checkpoints are sharded (out_dir/sharded, smallgpt/parallel.py), and last.pt and best.pt are made at the end.
Ctrl-C or SIGTERM: the current step finishes, last.pt is saved, and the run exits cleanly.

Read top to bottom: the schedule, the model, one optimizer step, the metrics log, then main's chapters
(processes and device, resume, evaluation and checkpoints, the log line) and the loop itself at the end.
"""
import json
import math
import os
import shlex
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import ARCH_KEYS, GPT, MULTIPLIER_SUFFIX, GPTConfig
from smallgpt.chat import ChatTokens, ConversationRows
from smallgpt.checkpoint import (code_version, find_checkpoint, load_checkpoint, lock_run_dir, model_from_checkpoint,
                                 newest_checkpoint, remove_stale_temporaries, save_checkpoint)
from smallgpt.condensation import condensation_metrics
from smallgpt.config import TrainConfig, load_train_config, model_args, with_vocab_size
from smallgpt.device import autocast, peak_flops, select_device, select_dtype, to_device
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.evaluation import bits_per_byte, loss_sums, read_hellaswag, score_hellaswag, token_bytes
from smallgpt.metrics import MetricsLog, read_records, summarize
from smallgpt.monitor import (MAX_SKIPS_IN_A_ROW, Clock, Health, compile_failure, count, duration, file_size, gpu_report,
                              probe_compiled)
from smallgpt.optim import configure_optimizer
from smallgpt.parallel import (consolidate, full_parameters, load_sharded, no_gradient_sync, read_sharded, save_sharded,
                               shard_model, shard_optimizer_state)
from smallgpt.plan import choose_batch_size, plan_report, plan_summary
from smallgpt.shards import open_split, read_meta
from smallgpt.tokenizer import (GPT2, GPT2_EOT, SPECIAL_TOKENS, check_same, checkpoint_tokenizer, get_tokenizer,
                                open_tokenizer)
from smallgpt.tokens import TrainWindows, fixed_windows, stack_windows

# -----------------------------------------------------------------------------
# Learning-rate schedule

def get_lr(it, cfg):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters ('cosine') or constant then a linear
    decay over the last wsd_decay_frac of lr_decay_iters ('wsd'); min_lr afterwards."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)  # it + 1: step 0 already takes a small step
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = wsd_decay_start(cfg)
        if it < decay_start:
            return cfg.learning_rate
        frac = (it - decay_start) / max(1, cfg.lr_decay_iters - decay_start)  # max(1, .): a decay of length 0 is a drop
        return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)
    frac = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    # frac 0 -> learning_rate, 1 -> min_lr
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


def wsd_decay_start(cfg):
    """The first step of the WSD decay (stable.pt holds the state just before it)."""
    # never inside the warm-up
    return max(cfg.warmup_iters, cfg.lr_decay_iters - int(cfg.wsd_decay_frac * cfg.lr_decay_iters))


SCHEDULE_KEYS = ("max_iters", "learning_rate", "decay_lr", "lr_schedule", "warmup_iters", "lr_decay_iters", "min_lr",
                 "wsd_decay_frac")


def schedule_change(old_config, cfg, it):
    """On resume at step `it`: a line naming the schedule keys that differ from the checkpoint's config and the lr
    at `it` under the old and the new schedule; None when nothing changed."""
    changed = {k: old_config[k] for k in SCHEDULE_KEYS if k in old_config and old_config[k] != getattr(cfg, k)}
    if not changed:
        return None
    # the old schedule: this config with the checkpoint's schedule keys
    old_lr, new_lr = get_lr(it, replace(cfg, **changed)), get_lr(it, cfg)
    line = (f"schedule changed on resume: {', '.join(f'{k} {v!r} -> {getattr(cfg, k)!r}' for k, v in changed.items())}; "
            f"lr at iter {it}: {old_lr:.2e} (old) -> {new_lr:.2e} (new)")
    if new_lr > 1.01 * old_lr:  # the checkpoint was decaying: the loss will jump with the lr
        line += ("; the lr jumps up, the loss will too: this checkpoint was decaying (to extend a run without a jump, "
                 "resume from its stable.pt: docs/monitoring.md)")
    return line


# -----------------------------------------------------------------------------
# Model set-up: from scratch, from a checkpoint (ours or nanoGPT's) or from HF GPT-2

def build_model(cfg, resume_ckpt, tokenizer=GPT2):
    """The model to train: resume_ckpt's, a new one, or one initialised from init_from (a checkpoint or HF GPT-2,
    which must use the data's tokenizer)."""
    args = model_args(cfg)
    if resume_ckpt is not None:  # the architecture must be the checkpoint's; training-time options may change
        # a key the checkpoint lacks is newer than it: the checkpoint was made with that key's default
        saved = {k: resume_ckpt["model_args"].get(k, getattr(GPTConfig, k)) for k in ARCH_KEYS}
        changed = [f"{k} (config {args[k]!r}, checkpoint {saved[k]!r})" for k in ARCH_KEYS if saved[k] != args[k]]
        if changed:
            raise ConfigError(f"cannot resume with a different architecture: {'; '.join(changed)}")
        # the checkpoint's shapes, this config's training options (dispersion...)
        model = GPT(GPTConfig(**{**args, **saved}))
        if "model" in resume_ckpt:  # a sharded checkpoint's weights are read later, into the sharded model (restore)
            # reads nanoGPT's names and torch.compile's _orig_mod. prefix too
            model.load_nanogpt_state_dict(resume_ckpt["model"])
        return model
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(**args))
    # a hub name, unless a file has that name
    if cfg.init_from.startswith("gpt2") and not os.path.exists(cfg.init_from):
        check_same(tokenizer, GPT2, f"data_dir {cfg.data_dir}", f"init_from={cfg.init_from}")
        try:
            source = GPT.from_pretrained(cfg.init_from)
        except (ImportError, OSError) as e:  # no transformers, no network, an unknown name
            raise DataError(f"cannot load {cfg.init_from} from Hugging Face: {(str(e).splitlines() or [''])[0]}")
    else:  # a checkpoint file or directory: its architecture, this config's other options, fresh multipliers
        ckpt = load_checkpoint(find_checkpoint(cfg.init_from, "last"))
        check_same(tokenizer, checkpoint_tokenizer(ckpt), f"data_dir {cfg.data_dir}", f"init_from={cfg.init_from}")
        source = model_from_checkpoint(ckpt)
    tied = source.config.tie_embeddings
    source.merge_multipliers(untie=True)  # plain weights: the multipliers of this run start afresh at 1
    if tied and not source.config.tie_embeddings:
        print("init_from: the trained per-token embedding multipliers fold only into an untied embedding: "
              "this run has tie_embeddings=False")
    # the source's shapes and block switches; the multiplier switches are this config's
    kept = {k: getattr(source.config, k) for k in ARCH_KEYS if k not in ("multipliers", "token_multipliers")}
    model = GPT(GPTConfig(**{**args, **kept}))
    # strict=False: this run's multipliers are new (they start at 1)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(MULTIPLIER_SUFFIX) for k in missing), (missing, unexpected)
    return model


def source_architecture(cfg, raw_model, rt):
    """cfg with the model's architecture: init_from a checkpoint or GPT-2 brings its own, which wins over the
    config's; the run says so, and config.json records it."""
    from_source = {k: getattr(raw_model.config, k) for k in ARCH_KEYS if getattr(raw_model.config, k) != getattr(cfg, k)}
    if from_source:
        rt.log(f"architecture of {cfg.init_from}: " + ", ".join(f"{k}={v!r} (config had {getattr(cfg, k)!r})"
                                                                for k, v in from_source.items()))
    return replace(cfg, **from_source)


# -----------------------------------------------------------------------------
# One optimizer step (bench/bench_train.py times this same function)

def train_step(model, optimizer, scaler, ctx, get_batch, accum, clip_params, grad_clip, no_sync=None, gate=None):
    """Accumulate gradients over `accum` micro-batches (get_batch(i) -> x, y on the device; no_sync: under DDP or
    FSDP, the context in which backward does not synchronise gradients, used for all but the last), clip, and
    step. Returns the sums over micro-batches of [CE, dispersion] (a device tensor: reading it waits for the GPU)
    and the global grad norm. gate(sums, grad_norm), when given, is asked before the update: False drops it (the
    gradients discarded, the optimizer untouched)."""
    sums = None
    for micro in range(accum):
        x, y = get_batch(micro)  # fetched while the GPU still runs the previous micro-batch
        # gradients are reduced over the ranks on the last micro-batch only: one communication per step
        with no_sync() if no_sync is not None and micro < accum - 1 else nullcontext():
            with ctx:
                _, losses = model(x, y)
            # / accum: the sum of the micro-batches' gradients is the big batch's mean
            scaler.scale(losses["loss"] / accum).backward()
        ce = losses["ce"].detach().float()  # the CE alone (no dispersion term): what the curves compare
        step_sums = torch.stack([ce, losses["dispersion"].detach().float() if "dispersion" in losses else 0 * ce])
        sums = step_sums if sums is None else sums + step_sums
    scaler.unscale_(optimizer)  # before clipping: the norm of the true gradients, not of float16's scaled ones
    # grad_clip 0: no clipping, but the norm is still measured for the log. Under FSDP each rank holds its shard of
    # every gradient: the norm is the global one all the same (a replicated DTensor)
    grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, grad_clip if grad_clip > 0 else float("inf"))
    if gate is None or gate(sums, grad_norm):
        scaler.step(optimizer)  # skips the update when float16 gradients overflowed (a plain step otherwise)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: the gradients' memory is free until the next backward
    return sums, grad_norm


# -----------------------------------------------------------------------------
# Logging (metrics.jsonl itself is written by smallgpt/metrics.py's MetricsLog)

def log_line(record, eta):
    """The console line of a train record: step | loss | lr | grad norm | ms | tok/s [| mfu] [| disp] | tokens |
    elapsed | ETA (None: not measured yet)."""
    line = (f"iter {record['iter']:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"norm {record['grad_norm']:6.3f} | {record['ms']:8.1f} ms | {record['tok_s']:9,.0f} tok/s")
    if "mfu" in record:
        line += f" | mfu {100 * record['mfu']:5.1f}%"
    if "dispersion" in record:
        line += f" | disp {record['dispersion']:.4f}"
    return (line + f" | tokens {count(record['tokens'])} | elapsed {duration(record['time_s'])} | "
            f"ETA {'?' if eta is None else duration(eta)}")


class StepLog:
    """After each optimizer step: the ETA clock, the spike checks (a warning and a 'health' record once per spike,
    and one per skipped update), and every log_interval steps the train record (metrics.jsonl) and its console line.
    Every rank keeps the spike watches (skips and rollbacks are decided alike everywhere); rank 0 only writes."""

    def __init__(self, run, flops_peak):
        self.cfg, self.rt, self.raw_model, self.metrics, self.flops_peak = run.cfg, run.rt, run.raw_model, run.metrics, flops_peak
        # ETA from the steps of this start, wall time over all starts
        self.clock = Clock(run.progress.iter_num, run.cfg.max_iters, run.progress.elapsed_s)
        self.health = run.health
        self.steps_timed, self.t0 = 0, time.time()  # the throughput of the steps since the last log line

    def __call__(self, progress, lr, ce, disp, grad_norm, skipped=None):
        cfg, it = self.cfg, progress.iter_num - 1  # the step just taken
        self.steps_timed += 1
        eta = self.clock.eta(progress.iter_num)
        # a line every log_interval steps, and at the last step
        due = progress.iter_num % cfg.log_interval == 0 or progress.iter_num == cfg.max_iters
        multiplier_stats = {}
        if due and cfg.multipliers != "none":  # read outside forward: under FSDP every rank gathers the weights
            with full_parameters(self.raw_model):
                multiplier_stats = self.raw_model.multiplier_stats()
        records = ([skipped] if skipped else []) + self.health.check(it, loss=ce, grad_norm=grad_norm)
        if not self.rt.master:
            return
        for record in records:
            self.rt.log(Health.message(record))
            self.metrics.write(record)
        if not due:
            return
        # the mean since the last line: a single slow step does not distort it
        dt = (time.time() - self.t0) / self.steps_timed
        # every rank's tokens: the whole run's throughput
        tok_s = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps / dt
        record = {"type": "train", "iter": it, "loss": ce, "lr": lr, "grad_norm": grad_norm, "ms": 1000 * dt,
                  "tok_s": tok_s, "tokens": progress.data_position * cfg.block_size, "time_s": self.clock.elapsed()}
        if self.flops_peak:
            # achieved model FLOP/s over the device's peak
            record["mfu"] = self.raw_model.flops_per_token() * tok_s / self.flops_peak
        if self.raw_model.config.dispersion_coeff > 0:
            record["dispersion"] = disp
        record.update(multiplier_stats)
        self.rt.log(log_line(record, eta))
        self.metrics.write(record)
        self.steps_timed, self.t0 = 0, time.time()


# -----------------------------------------------------------------------------
# main's chapters

@dataclass
class Runtime:
    """Where this process runs: its rank among `world` processes, device, precision, autocast context."""
    ddp: bool  # under torchrun: several processes (DDP, or FSDP when fsdp)
    rank: int
    local_rank: int
    world: int
    device: str
    dtype: str
    accum: int  # micro-batches per optimizer step on this rank
    fsdp: bool = False  # parallel='fsdp': the model sharded over the processes (smallgpt/parallel.py)

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def setup_runtime(cfg):
    """Processes (torchrun sets RANK / WORLD_SIZE), device and precision."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun sets these; plain python is one process
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    if cfg.parallel == "fsdp" and not ddp:
        raise ConfigError("parallel=fsdp shards the model over the processes that torchrun starts: run it as "
                          "torchrun --standalone --nproc_per_node=<GPUs> train.py ... (docs/training.md)")
    device = select_device(cfg.device)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"  # one GPU per process on this node
            torch.cuda.set_device(device)
        # NCCL between GPUs, gloo between CPU processes (the tests)
        backend = cfg.backend if cfg.backend != "auto" else "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible by "
                          f"the number of processes ({world})")
    if cfg.deterministic:  # docs/reproducibility.md: CPU results depend on how many threads each kernel gets
        if not device.startswith("cpu"):
            raise ConfigError(f"deterministic=True is implemented for CPU runs only, not {device}")
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls in TF32 on Ampere and later: faster, precise enough
    torch.backends.cudnn.allow_tf32 = True
    return Runtime(ddp, rank, local_rank, world, device, select_dtype(cfg.dtype, device),
                   cfg.gradient_accumulation_steps // world, fsdp=cfg.parallel == "fsdp")


def plan_vocab(data_dir):
    """The data's vocabulary for --plan: its manifest's, else (no data prepared yet) GPT-2's and the chat tokens."""
    try:
        return read_meta(data_dir)["vocab_size"]
    except DataError:
        return GPT2_EOT + len(SPECIAL_TOKENS)


def batch_ids(cfg, eot_token, data_vocab, chat=None):
    """The ids a batch may hold (a batch holding another stops with one line). The model needs a row for every id
    of text; one made from HF GPT-2 has 50,257, none for the reserved chat tokens, and still trains on text.
    Conversations (chat: ChatTokens) hold the chat markers: the model needs their rows too."""
    if eot_token >= cfg.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the data's vocabulary ({data_vocab})")
    if chat is not None and chat.vocab_size > cfg.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} has no rows for the chat markers (ids up to "
                          f"{chat.vocab_size - 1}): fine-tune a model with the padded vocabulary (train.py's models "
                          f"have it; HF GPT-2 has 50,257 rows)")
    return min(data_vocab, cfg.vocab_size)


RESUME_KEYS = ("optimizer", "scaler", "iter_num", "data_position", "best_val_loss", "rng")


def read_resume_checkpoint(cfg, tokenizer):
    """The checkpoint to continue from with init_from=resume: the newer of last.pt and best.pt (both hold the full
    training state; last.pt on a tie), trained on the data's tokenizer. best.pt is the newer one after a kill
    between the two writes (best.pt is written first) and, with always_save_checkpoint=False, whenever the run
    improved since its last last.pt. An FSDP run's sharded last and best count alike (smallgpt/parallel.py). None
    for a new run, which refuses an out_dir that already holds a run's checkpoints."""
    # an untrained model's val loss is log(vocab): nothing to learn from
    if cfg.eval_only and cfg.init_from == "scratch":
        raise ConfigError("eval_only evaluates a trained model: set init_from=resume (out_dir/last.pt), a checkpoint "
                          "path or gpt2")
    # in the order resume prefers them
    existing = [n for n in ("last.pt", "best.pt") if os.path.exists(os.path.join(cfg.out_dir, n))]
    sharded = newest([read_sharded(cfg.out_dir, "last"), read_sharded(cfg.out_dir, "best")])  # parallel=fsdp's
    if cfg.init_from != "resume":
        if (existing or sharded) and not cfg.eval_only:
            held = ", ".join(existing + ["sharded"] * bool(sharded))
            raise ConfigError(f"{cfg.out_dir} already holds checkpoints ({held}): continue that run with "
                              f"--init_from=resume, or choose another out_dir")
        return None
    if not existing and not sharded:
        raise DataError(f"init_from=resume but {cfg.out_dir} holds no last.pt or best.pt")
    ckpt = newest_resume_checkpoint(cfg)
    trained_with = ckpt.get("config", {}).get("optimizer", "adamw")  # AdamW and Muon states differ
    if trained_with != cfg.optimizer and not cfg.eval_only:
        raise ConfigError(f"cannot resume a run trained with optimizer={trained_with} with optimizer={cfg.optimizer}: "
                          f"start a new run from its weights with --init_from={ckpt['path']}")
    check_same(tokenizer, checkpoint_tokenizer(ckpt), f"data_dir {cfg.data_dir}", ckpt["path"])
    return ckpt


def newest_resume_checkpoint(cfg):
    """The newest checkpoint of out_dir with a run's whole training state (resume and rollback read it), or None:
    the newer of last.pt and best.pt (last.pt on a tie; best.pt is the newer one after a kill between the two
    writes) or of an FSDP run's sharded last and best, whichever is newer; at the same iteration, the kind this
    run writes (every FSDP rank would read a file)."""
    path = newest_checkpoint(cfg.out_dir)
    ckpt = read_resume_file(path) if path else None
    sharded = newest([read_sharded(cfg.out_dir, "last"), read_sharded(cfg.out_dir, "best")])
    if sharded and (ckpt is None or sharded["iter_num"] > ckpt["iter_num"] or
                    sharded["iter_num"] == ckpt["iter_num"] and cfg.parallel == "fsdp"):
        ckpt = sharded
    return ckpt


def newest(checkpoints):
    """The checkpoint with the highest iter_num among those that exist (not None); the first of equals."""
    found = [c for c in checkpoints if c is not None]
    return max(found, key=lambda c: c["iter_num"]) if found else None


def read_resume_file(path):
    """A single-file checkpoint to resume from, checked: written by this train.py, in the current layout."""
    ckpt = load_checkpoint(path)  # on CPU: weights move to the device with the model
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise DataError(f"{path} was not written by this train.py (no {', '.join(missing)}): start a new run from "
                        f"it with --init_from={path} instead")
    if any(".attn.c_attn." in k for k in ckpt["model"]):  # its AdamW state has one tensor per fused c_attn
        raise DataError(f"{path} predates the split attention matrices (c_q, c_k, c_v): its weights load but its "
                        f"optimizer state does not; start a new run from it with --init_from={path}")
    ckpt["path"] = path
    return ckpt


@dataclass
class Progress:
    """Everything besides weights, optimizer and RNG that a stopped run needs to continue exactly."""
    iter_num: int = 0  # optimizer steps taken
    data_position: int = 0  # training windows consumed, over all ranks
    best_val_loss: float = float("inf")
    evaluated: bool = False  # whether iter_num's evaluation ran (a resumed run runs it if not)
    elapsed_s: float = 0.0  # the run's wall time so far, over all its starts


@dataclass
class Run:
    """A run's state in one place, built once by main: the chapters below (checkpoints, evaluation, the loop) read
    and write it."""
    cfg: object  # TrainConfig, as resolved at start (an init_from architecture and a compile fallback applied)
    rt: Runtime
    raw_model: GPT  # the module itself: its weights go into checkpoints, its statistics into the log
    model: torch.nn.Module  # what a step calls: raw_model, compiled and/or wrapped in DDP
    optimizer: object  # torch.optim.AdamW or optim.MuonAdamW
    scaler: torch.amp.GradScaler  # enabled for float16 only
    progress: Progress
    tokenizer: dict  # the data's tokenizer record (with its text): every checkpoint carries it
    health: Health  # the spike watches: warnings, skipped updates, rollbacks (their state is in every checkpoint)
    metrics: object = None  # MetricsLog on rank 0 of a training run; None elsewhere
    no_sync: object = None  # DDP's or FSDP's context without gradient synchronisation; None in one process
    rolled_back_to: int = -1  # the iteration of the checkpoint of this start's last rollback


def load_training_state(ckpt, raw_model, optimizer, scaler, health, rt):
    """Load a checkpoint's optimizer, grad scaler and spike-watch state, and a sharded checkpoint's weights (resume
    and rollback)."""
    # load_state_dict restores the checkpoint's group settings: keep this run's
    wanted = [{k: g[k] for k in ("weight_decay", "lr_scale", "betas", "eps") if k in g} for g in optimizer.param_groups]
    if "sharded" in ckpt:  # DCP reads this rank's part, whatever number of processes wrote it (smallgpt/parallel.py)
        load_sharded(ckpt, raw_model, optimizer)
    else:  # under FSDP each rank keeps its shard of the file's tensors
        optimizer.load_state_dict(shard_optimizer_state(ckpt["optimizer"], optimizer) if rt.fsdp else ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, wanted):  # this run's settings, not the checkpoint's
        group.update(settings)
    scaler.load_state_dict(ckpt["scaler"])
    health.load(ckpt.get("health"))  # older checkpoints have none: the watches start afresh


def restore(ckpt, raw_model, optimizer, scaler, health, rt):
    """Load a checkpoint's optimizer, scaler, spike-watch and RNG state (and a sharded checkpoint's weights); return
    its Progress."""
    load_training_state(ckpt, raw_model, optimizer, scaler, health, rt)
    torch.set_rng_state(ckpt["rng"]["torch"])  # the dispersion loss's draws continue where the run stopped
    if "cuda" in ckpt["rng"] and rt.device_type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    # older checkpoints: evaluated at save
    return Progress(ckpt["iter_num"], ckpt["data_position"], ckpt["best_val_loss"], ckpt.get("evaluated", True),
                    ckpt.get("elapsed_s", 0.0))


def save(run, *names):
    """Write out_dir/name for each of names ('last.pt', 'best.pt', 'stable.pt') with everything an exact resume
    needs, atomically (a kill leaves the old file). Under FSDP every rank writes its part of one sharded checkpoint
    that the names point at (out_dir/sharded: smallgpt/parallel.py); otherwise rank 0 writes the files."""
    cfg, progress = run.cfg, run.progress
    rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if run.rt.device_type == "cuda" else {})}
    contents = {
        "format": "gpt-checkpoint", "version": 1, "code_version": code_version(), "model_args": asdict(run.raw_model.config),
        "scaler": run.scaler.state_dict(), "config": asdict(cfg), **asdict(progress),
        "tokens_seen": progress.data_position * cfg.block_size, "rng": rng,
        "tokenizer": run.tokenizer,  # so that sample.py, eval.py, export.py... need nothing but the checkpoint
        "health": run.health.state(),  # the spike watches: a resumed run decides its skips and rollbacks alike
    }
    if run.rt.fsdp:
        save_sharded(cfg.out_dir, [name.removesuffix(".pt") for name in names], run.raw_model, run.optimizer, contents)
    elif run.rt.master:
        contents.update(model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict())
        for name in names:
            save_checkpoint(contents, os.path.join(cfg.out_dir, name))


class Evaluator:
    """Mean CE over fixed validation windows (spread over ranks), bits per byte, HellaSwag (every
    hellaswag_interval) and the condensation scores."""

    def __init__(self, cfg, val_tokens, data_ids, rt, tokenizer, chat=None):
        """data_ids: a batch holding an id >= data_ids stops with one line; tokenizer: the data's record; chat
        (sft=True): the chat template's tokens."""
        self.cfg, self.tokens, self.rt, self.vocab_size = cfg, val_tokens, rt, data_ids
        # the same windows (sft: conversations, loss on the assistant's tokens) every time: evaluations compare
        n, bs = cfg.eval_iters * cfg.batch_size, cfg.batch_size
        if chat is not None:
            rows = ConversationRows(val_tokens, cfg.block_size, cfg.seed, chat)
            fixed = rows.fixed(n)
            self.batch = lambda b: rows.rows(fixed[b * bs:(b + 1) * bs])
        else:
            starts = fixed_windows(val_tokens, n, cfg.block_size)
            self.batch = lambda b: stack_windows(val_tokens, starts[b * bs:(b + 1) * bs], cfg.block_size, data_ids)
        self.cond_len = min(512, cfg.block_size)  # the paper measures condensation on 512-token sequences
        self.cond_starts = fixed_windows(val_tokens, cfg.condensation_seqs, self.cond_len) if cfg.condensation_seqs else []
        enc = get_tokenizer(tokenizer)  # bits per byte count each target token's bytes; HellaSwag encodes text
        self.token_bytes, self.encode = token_bytes(enc, cfg.vocab_size).to(rt.device), enc.encode_ordinary
        self.hellaswag = (read_hellaswag(cfg.hellaswag_file, limit=cfg.hellaswag_items, remedy="set hellaswag_file "
                                         "to a local copy, or hellaswag_interval=0")[1] if cfg.hellaswag_interval else None)

    @torch.no_grad()
    def __call__(self, model, raw_model, iter_num):
        # FSDP: each rank holds the whole model for the evaluation, so that the uneven splits below (batches and
        # HellaSwag items over the ranks) need no matching forwards on every rank
        with full_parameters(raw_model):
            return self.evaluate(model, raw_model, iter_num)

    def evaluate(self, model, raw_model, iter_num):
        cfg, rt = self.cfg, self.rt
        model.eval()
        # sums of: nats of all targets, targets, nats of the targets that carry bytes, their bytes (evaluation.py)
        # float64: sums over millions of targets keep their digits
        total = torch.zeros(4, device=rt.device, dtype=torch.float64)
        for b in range(rt.rank, cfg.eval_iters, rt.world):  # each rank takes every world-th batch; all_reduce sums them
            x, y = self.batch(b)
            x, y = to_device(x, rt.device), to_device(y, rt.device)  # pinned and non-blocking on CUDA
            with autocast(rt.device, rt.dtype):  # one forward: per-target CE, summed two ways
                total += loss_sums(model(x, y, per_token=True)[1]["ce_tokens"], y, self.token_bytes)
        if rt.ddp:
            dist.all_reduce(total)
        val_loss = (total[0] / total[1]).item()  # .item() waits for the GPU: once per evaluation
        if not math.isfinite(val_loss):
            raise DataError(f"val loss is {val_loss} at iter {iter_num}: stopped without saving")
        result = {"val_loss": val_loss, "val_bpb": bits_per_byte(total[2], total[3]).item(), **raw_model.weight_norms()}
        if self.hellaswag and (iter_num % cfg.hellaswag_interval == 0 or iter_num >= cfg.max_iters):
            with autocast(rt.device, rt.dtype):  # the uncompiled model: varying lengths would make compile recompile
                result.update(score_hellaswag(lambda idx: raw_model(idx)[0], self.hellaswag, self.encode,
                                              cfg.block_size, rt.device, rank=rt.rank, world=rt.world))
        model.train()
        # rank 0 only: a diagnostic, not part of the val loss. Under FSDP every rank runs it: it calls the blocks
        # without the root's forward, which FSDP's hooks handle only when all ranks do it alike
        if self.cond_starts and (rt.master or rt.fsdp):
            x, _ = stack_windows(self.tokens, self.cond_starts, self.cond_len, self.vocab_size)
            with autocast(rt.device, rt.dtype):
                result.update(condensation_metrics(raw_model, to_device(x, rt.device)))
        return result


def conversation_data(cfg, meta, tok):
    """With sft=True: the chat template's tokens (ChatTokens of the data's tokenizer tok), checked against the ids
    the data was rendered with; None for plain text. Conversation data without sft would train on every token:
    refused."""
    if not cfg.sft:
        if "chat" in meta:
            raise ConfigError(f"{cfg.data_dir} holds conversations: fine-tune on them with sft=True (docs/chat.md)")
        return None
    if "chat" not in meta:
        raise ConfigError(f"sft=True needs conversations from data/chat/prepare.py; {cfg.data_dir} holds plain text")
    chat = ChatTokens(tok.enc)
    if meta["chat"].get("special_tokens") != chat.ids:
        raise DataError(f"{cfg.data_dir} was rendered with other chat token ids than this tokenizer's: prepare it again")
    return chat


def training_order(cfg, rt, data_ids, train_tokens, chat):
    """The training batches in a seeded order without replacement: windows of the token stream, each once per epoch;
    with chat (sft=True), conversations, one a row, the loss on the assistant's tokens."""
    if chat is None:
        return TrainWindows(train_tokens, cfg.block_size, cfg.seed, data_ids)
    rows = ConversationRows(train_tokens, cfg.block_size, cfg.seed, chat)
    rt.log(f"sft: {rows.count:,} train conversations, {rows.too_long:,} of them longer than block_size + 1 (cut "
           f"there); the loss on the assistant's tokens only")
    return rows


def compile_model(cfg, rt, raw_model):
    """torch.compile, tried at once on a training-shaped batch: compilation is lazy, and a missing C compiler or
    missing Python headers would otherwise surface mid-step. On failure: one line with the cause and the fix, then
    the uncompiled model (compile_fallback, said loudly) or a stop. Returns (model, cfg, failure line or None)."""
    if not cfg.compile:
        return raw_model, cfg, None
    model = torch.compile(raw_model)  # shares raw_model's parameters: checkpoints keep raw_model's names
    # compiles now, on a real-shaped batch
    error = probe_compiled(model, cfg.batch_size, cfg.block_size, rt.device, autocast(rt.device, rt.dtype))
    if error is None:
        return model, cfg, None
    failure = compile_failure(error)
    if not cfg.compile_fallback:
        raise DataError(failure)
    rt.log(f"WARNING: {failure}")
    rt.log("WARNING: training WITHOUT torch.compile (eager mode, slower) since compile_fallback=True; "
           "config.json records it")
    return raw_model, replace(cfg, compile=False), failure


def distribute(cfg, rt, raw_model, model):
    """Under torchrun, the model a step calls and the context in which its backward leaves the gradients
    unsynchronised (gradient accumulation). DDP: its wrapper, which all-reduces gradients in backward. FSDP: the
    model as it is (sharded already: it reduce-scatters in backward); with fsdp_sync_every_micro_batch, after
    every backward. One process: the model, no context."""
    if rt.fsdp:
        return model, None if cfg.fsdp_sync_every_micro_batch else lambda: no_gradient_sync(raw_model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        return model, model.no_sync
    return model, None


def print_start(run, train_tokens, resumed_from, flops_peak):
    cfg, rt, raw_model, progress = run.cfg, run.rt, run.raw_model, run.progress
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    rt.log(f"code {code_version()}")
    defaults = asdict(TrainConfig())  # every key is in config.json: the console shows what this run changed
    changed = ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items() if v != defaults[k])
    rt.log(f"config (keys that differ from the defaults{'' if cfg.eval_only else f'; all keys: {cfg.out_dir}/config.json'}): "
           f"{changed or 'none'}")
    sharded = " (FSDP: weights, gradients and optimizer state sharded over them)" if rt.fsdp else ""
    rt.log(f"device {rt.device}, dtype {rt.dtype}, {rt.world} process(es){sharded}, compile {cfg.compile}")
    rt.log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters (position embeddings not counted); "
           f"{raw_model.flops_per_token() / 1e6:.0f} MFLOPs per token")
    rt.log(f"tokens per step: {cfg.batch_size} batch x {cfg.block_size} block x {cfg.gradient_accumulation_steps} "
           f"accumulation = {tokens_per_step:,} ({rt.accum} micro-batches per process); train split "
           f"{len(train_tokens):,} tokens = {len(train_tokens) / tokens_per_step:.1f} steps per epoch")
    if flops_peak is None and rt.device_type == "cuda":
        rt.log("MFU not reported: unknown GPU peak FLOP/s (set peak_flops)")
    if resumed_from:
        rt.log(f"resumed from {resumed_from} at iter {progress.iter_num} (best val loss {progress.best_val_loss:.4f})")


class StopRequest:
    """Ctrl-C / SIGTERM: remembered, and acted on only once all ranks agree, after a step. A second one kills."""

    def __init__(self, cfg, rt):
        self.signals, self.cfg, self.rt = [], cfg, rt
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        self.signals.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once
        self.rt.log(f"\n{signal.Signals(signum).name}: finishing this step, then saving {self.cfg.out_dir}/last.pt")

    def __bool__(self):
        return bool(self.signals)


# -----------------------------------------------------------------------------

def main(argv):
    cfg = load_train_config(argv)
    if cfg.plan:  # memory and time from the config alone: no token read, nothing allocated
        print(plan_report(with_vocab_size(cfg, plan_vocab(cfg.data_dir))))
        return
    rt = setup_runtime(cfg)
    if rt.master and rt.device_type == "cuda":  # before we allocate: does another process hold part of the card?
        print("\n".join(gpu_report(rt.device) + [plan_summary(cfg, rt.world)]))
    train_tokens, meta = open_split(cfg.data_dir, "train")  # opened first: a wrong data_dir fails before any model
    val_tokens, _ = open_split(cfg.data_dir, "val")
    lock = claim_out_dir(cfg, rt)  # held while this process lives
    tok = open_tokenizer(cfg.data_dir)  # its record goes into every checkpoint; a resumed or init_from one must match
    chat = conversation_data(cfg, meta, tok)  # sft=True: the chat template's tokens (and conversations, no text)
    cfg = with_vocab_size(cfg, meta["vocab_size"])  # 0 = the data's tokenizer, padded to a multiple of 64

    # --- model, optimizer, and the state of a resumed run
    ckpt = read_resume_checkpoint(cfg, tok.record)
    if finished_already(ckpt, cfg, rt):
        return
    raw_model = build_model(cfg, ckpt, tok.record)  # on CPU, then moved: one copy on the device (FSDP: 1/world of it)
    raw_model = shard_model(raw_model, rt.device, rt.dtype) if rt.fsdp else raw_model.to(rt.device)
    cfg = source_architecture(cfg, raw_model, rt)
    cfg = choose_batch_size(cfg, raw_model, rt, ckpt["config"] if ckpt is not None else None)  # batch_size='auto'
    rt.accum = cfg.gradient_accumulation_steps // rt.world
    data_ids = batch_ids(cfg, tok.enc.eot_token, meta["vocab_size"], chat)
    # AdamW, or Muon + AdamW; after sharding: under FSDP it steps this rank's shards
    optimizer = configure_optimizer(raw_model, cfg, rt.device_type, rt.dtype)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")  # a no-op unless float16
    health = Health(cfg.loss_spike_factor, cfg.grad_spike_factor)
    progress = restore(ckpt, raw_model, optimizer, scaler, health, rt) if ckpt is not None else Progress()
    resumed_from = ckpt["path"] if ckpt is not None else None
    schedule_note = schedule_change(ckpt["config"], cfg, progress.iter_num) if ckpt is not None else None
    del ckpt  # free the memory it holds
    model, cfg, compile_error = compile_model(cfg, rt, raw_model)
    model, no_sync = distribute(cfg, rt, raw_model, model)
    run = Run(cfg, rt, raw_model, model, optimizer, scaler, progress, tok.record, health, no_sync=no_sync)

    # --- what the loop reads and writes
    windows = training_order(cfg, rt, data_ids, train_tokens, chat)
    evaluate = Evaluator(cfg, val_tokens, data_ids, rt, tok.record, chat)  # reads (or downloads) HellaSwag first
    flops_peak = peak_flops(rt.device, cfg.peak_flops)  # None when unknown: no MFU then
    if rt.master and not cfg.eval_only:  # eval_only prints its result and writes nothing
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({**asdict(cfg), "code_version": code_version(),  # the resolved config: what this run really used
                       **({"compile_error": compile_error} if compile_error else {})}, f, indent=1)
    print_start(run, train_tokens, resumed_from, flops_peak)
    if schedule_note:
        rt.log(schedule_note)
    if cfg.eval_only:
        t0 = time.time()
        rt.log(eval_line(progress.iter_num, evaluate(model, raw_model, progress.iter_num), time.time() - t0))
        return
    if rt.master:  # trims records after a resumed checkpoint
        run.metrics = MetricsLog(cfg, progress.iter_num if resumed_from else None)
    train_loop(run, windows, evaluate, flops_peak)
    print_summary(run)
    if rt.ddp:  # wait for rank 0's checkpoint write: a rank tearing gloo down early can abort its peers
        dist.barrier()
        dist.destroy_process_group()


def claim_out_dir(cfg, rt):
    """Rank 0 of a training run: lock out_dir (a second trainer there stops with one line), then delete what a
    killed run left half-written. Returns the lock (None elsewhere: eval_only writes nothing)."""
    if not rt.master or cfg.eval_only:
        return None
    lock = lock_run_dir(cfg.out_dir)
    removed = remove_stale_temporaries(cfg.out_dir)  # safe only now: no other trainer writes here
    if removed:
        rt.log(removed)
    return lock


def finished_already(ckpt, cfg, rt):
    """Whether a resumed run already reached max_iters with its last.pt written: then it says so and nothing is
    touched (job schedulers restart finished jobs). A finished run whose newest file is best.pt (killed between
    the final two writes) goes on into the loop, which writes last.pt at once."""
    if ckpt is None or ckpt["iter_num"] < cfg.max_iters or cfg.eval_only:
        return False
    if os.path.basename(ckpt["path"]) != "last.pt":
        rt.log(f"{ckpt['path']} is at iter {ckpt['iter_num']} (max_iters {cfg.max_iters}) but last.pt is older: "
               f"writing last.pt")
        return False
    rt.log(f"{ckpt['path']} is at iter {ckpt['iter_num']}: this run already reached max_iters {cfg.max_iters}. "
           f"Nothing to do (raise --max_iters to train further)")
    return True


def eval_line(iter_num, result, seconds):
    return (f"eval {iter_num}: val loss {result['val_loss']:.4f} | val bpb {result['val_bpb']:.4f}"
            + (f" | hellaswag acc_norm {result['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in result else "")
            + (f" | condensation spearman {result['cond/spearman']:+.2f}" if "cond/spearman" in result else "")
            + f" | took {duration(seconds)}")


def evaluate_due(run, evaluate, stopping):
    """Evaluate this iteration unless a stop was requested or the stopped run that this one resumes already did.
    Returns whether val loss improved on the best so far."""
    progress = run.progress
    if stopping or progress.evaluated:
        return False
    t0 = time.time()
    result = evaluate(run.model, run.raw_model, progress.iter_num)
    progress.evaluated = True
    run.rt.log(eval_line(progress.iter_num, result, time.time() - t0))
    if run.rt.master:
        run.metrics.write({"type": "eval", "iter": progress.iter_num, **result})
    if result["val_loss"] >= progress.best_val_loss:  # ties keep the earlier best
        return False
    progress.best_val_loss = result["val_loss"]
    return True


def write_checkpoints(run, done, improved):
    """best.pt when val loss improved, then last.pt at every evaluation (always_save_checkpoint) and at the end.
    best.pt first: no file records a val loss before best.pt holds its weights, so a kill between the two writes
    cannot lose the best weights (it leaves best.pt the newer file, which resume then takes). Under FSDP one sharded
    checkpoint is written and its pointers replaced in the same order; at the end rank 0 also makes them the single
    files that sample.py, eval.py and export.py read."""
    cfg, progress = run.cfg, run.progress
    if progress.iter_num == 0:  # nothing trained yet, nothing to save
        return
    last = done or (progress.evaluated and cfg.always_save_checkpoint)
    if last and cfg.spike_action == "rollback" and run.health.in_loss_spike() and progress.iter_num < cfg.max_iters:
        # the newest checkpoint must stay a state from before the spike, to roll back to
        run.rt.log(f"last.pt not written at iter {progress.iter_num}: the loss is in a spike (spike_action=rollback)"
                   + ("; a resumed run replays the steps since the newest checkpoint" if done else ""))
        last = False
    names = ["best.pt"] * improved + ["last.pt"] * last
    if names:
        save(run, *names)
    if improved:
        run.rt.log(f"saved {cfg.out_dir}/best.pt: val loss {progress.best_val_loss:.4f}, the best so far")
    if done and run.rt.fsdp and run.rt.master:
        for name in ("best", "last"):
            if read_sharded(cfg.out_dir, name):
                consolidate(cfg.out_dir, name, os.path.join(cfg.out_dir, f"{name}.pt"))
    if done and last:
        run.rt.log(f"saved {cfg.out_dir}/last.pt at iter {progress.iter_num}")


def print_summary(run):
    """The run's last lines: where it stopped, its best evaluation, the files in out_dir and what to run next."""
    cfg, progress = run.cfg, run.progress
    if not run.rt.master:
        return
    finished = progress.iter_num >= cfg.max_iters
    best = summarize(read_records(cfg.out_dir, skip_damaged=True))  # the whole curve, over every resume
    run.rt.log(f"{'done' if finished else 'stopped'} at iter {progress.iter_num}: "
               f"{count(progress.data_position * cfg.block_size)} tokens in {duration(progress.elapsed_s)}; "
               + (f"best val loss {best['best_val_loss']:.4f} at iter {best['best_iter']} (best.pt)"
                  if best["best_val_loss"] is not None else "no evaluation yet"))
    files = [n for n in ("best.pt", "last.pt", "stable.pt", "metrics.jsonl", "config.json")
             if os.path.exists(os.path.join(cfg.out_dir, n))]
    run.rt.log(f"files in {cfg.out_dir}: "
               + ", ".join(f"{n} {file_size(os.path.getsize(os.path.join(cfg.out_dir, n)))}" for n in files))
    run.rt.log(f"sample from it: python sample.py --out_dir={shlex.quote(cfg.out_dir)}" if finished else
               "continue it: the same command with --init_from=resume")


# -----------------------------------------------------------------------------
# Spikes: a step's numbers, a skipped update, a rollback (spike_action; docs/monitoring.md)

def read_step(run, sums, grad_norm, stop):
    """A step's numbers on the host: the true mean CE and dispersion over every micro-batch of every rank, the
    gradient norm, and whether any rank was asked to stop. One all-reduce and one wait for the GPU per step."""
    rt, n = run.rt, run.cfg.gradient_accumulation_steps
    sums = torch.cat([sums, torch.tensor([float(bool(stop))], device=rt.device)])  # + stop votes
    if rt.ddp:
        dist.all_reduce(sums)
    ce, disp, stop_votes = sums.tolist()  # one transfer for the loss, the dispersion and the stop votes
    return ce / n, disp / n, grad_norm.item(), stop_votes > 0  # .item(): the GPU is done already


class SkipGate:
    """spike_action='skip', asked by train_step before the update of step `it`: it reads the step's numbers there
    (the step's one wait for the GPU, moved from after the update to before it) and drops the update when the loss
    or the gradient norm is a spike or not finite: the gradients discarded, the optimizer state untouched, the
    step's windows consumed all the same. `skipped`: the 'skip' health record, or None."""

    def __init__(self, health, it, scaler_enabled, read):
        self.health, self.it, self.scaler_enabled, self.read = health, it, scaler_enabled, read
        self.numbers = self.skipped = None

    def __call__(self, sums, grad_norm):
        self.numbers = self.read(sums, grad_norm)  # (ce, dispersion, grad norm, stopping)
        self.skipped = self.health.skip(self.it, self.numbers[0], self.numbers[2], self.scaler_enabled)
        return self.skipped is None


def diverged(run, ce):
    """The error that ends a run whose loss is not finite (spike_action='warn', or nothing to roll back to)."""
    last = newest_checkpoint(run.cfg.out_dir)
    return DataError(f"loss is {ce} at iter {run.progress.iter_num}: stopped without saving (last good checkpoint: "
                     f"{last or 'none yet'}); try a lower learning_rate")


def heal(run, ce):
    """After a step's log: stop a run that skips every update, or roll back a diverged one."""
    cfg = run.cfg
    if run.health.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
        raise DataError(f"{MAX_SKIPS_IN_A_ROW} updates in a row skipped (iters up to {run.progress.iter_num - 1}): "
                        f"skipping does not cure this run; try spike_action=rollback or a lower learning_rate")
    if cfg.spike_action == "rollback" and run.health.diverged(ce, cfg.rollback_patience):
        roll_back(run, ce)


def roll_back(run, ce):
    """The newest checkpoint's weights, optimizer and spike watches come back, while the step count, the RNG and
    the data position go on: the windows since that checkpoint are skipped, and the lr schedule continues (PaLM's
    recipe: restart from before the spike, past the data that led to it). No last.pt is written during a loss
    spike, so the newest checkpoint predates it. A second rollback to the same checkpoint stops the run."""
    cfg, rt, progress = run.cfg, run.rt, run.progress
    ckpt = newest_resume_checkpoint(cfg)  # as resume picks it: under FSDP, the sharded ones count alike
    if ckpt is None:
        if not math.isfinite(ce):
            raise diverged(run, ce)
        rt.log(f"warning: the loss diverged at iter {progress.iter_num - 1} but there is no checkpoint to roll back "
               f"to yet (spike_action=rollback): going on")
        return
    path = ckpt["path"]
    if ckpt["iter_num"] == run.rolled_back_to:
        raise DataError(f"loss is {ce} at iter {progress.iter_num - 1}, diverged again after the rollback to {path} "
                        f"(iter {ckpt['iter_num']}): stopped without saving; try a lower learning_rate")
    if "sharded" not in ckpt and rt.fsdp:  # a file's whole tensors: FSDP's shards are made when the model is built
        raise DataError(f"loss is {ce} at iter {progress.iter_num - 1}: the newest checkpoint, {path}, is a single file "
                        f"that parallel=fsdp cannot roll back to: stopped without saving; resume from it")
    if "sharded" not in ckpt:  # a sharded checkpoint's weights come with its optimizer state below
        run.raw_model.load_state_dict(ckpt["model"])  # in place: the compiled and DDP models share these tensors
    load_training_state(ckpt, run.raw_model, run.optimizer, run.scaler, run.health, rt)
    run.rolled_back_to = ckpt["iter_num"]
    record = {"type": "health", "iter": progress.iter_num - 1, "what": "rollback", "checkpoint": os.path.basename(path),
              "to_iter": ckpt["iter_num"], "windows": [ckpt["data_position"], progress.data_position], "value": ce,
              "factor": cfg.loss_spike_factor, "steps": cfg.rollback_patience}
    rt.log(Health.message(record))
    if rt.master:
        run.metrics.write(record)


def save_stable(run):
    """With lr_schedule='wsd': stable.pt when the decay starts, the state after the last constant-lr step. A run
    resumed from it with a later lr_decay_iters goes on at the constant lr and decays at its new end."""
    cfg = run.cfg
    if cfg.lr_schedule == "wsd" and cfg.decay_lr and run.progress.iter_num == wsd_decay_start(cfg):
        save(run, "stable.pt")
        run.rt.log(f"saved {cfg.out_dir}/stable.pt at iter {run.progress.iter_num} (the decay starts): extend the run "
                   f"from it (docs/monitoring.md)")


def train_loop(run, windows, evaluate, flops_peak):
    """Until max_iters or a stop: evaluate and checkpoint when due, one optimizer step, the log line."""
    cfg, rt, progress, optimizer = run.cfg, run.rt, run.progress, run.optimizer
    stop, stopping = StopRequest(cfg, rt), False
    clip_params = run.raw_model.parameters_to_clip()  # the multipliers are neither clipped nor counted in the norm
    step_log = StepLog(run, flops_peak)
    while True:
        # every eval_interval steps and at the end: evaluate, then checkpoint. A stop request saves without
        # evaluating; the checkpoint records whether this iteration's evaluation ran, so a resumed run does it
        # if it did not (and does not repeat it if it did).
        done = progress.iter_num >= cfg.max_iters or stopping
        progress.elapsed_s = step_log.clock.elapsed()  # saved with any checkpoint below
        if done or progress.iter_num % cfg.eval_interval == 0:
            improved = evaluate_due(run, evaluate, stopping)
            done = done or (not rt.ddp and bool(stop))  # one process: a Ctrl-C during the evaluation saves now
            write_checkpoints(run, done, improved)
        if done:
            return
        save_stable(run)

        # one optimizer step: accum micro-batches on each rank, gradients synchronised on the last one
        lr = get_lr(progress.iter_num, cfg)  # from the step count alone: a resumed run continues the schedule
        for group in optimizer.param_groups:  # each group's lr_scale: Muon, embeddings, multipliers (optim.py)
            group["lr"] = lr * group["lr_scale"]
        first = progress.data_position + rt.rank * rt.accum * cfg.batch_size  # this rank's windows of the step
        # windows are numbered over ranks and steps: data_position alone places a resumed run
        get_batch = lambda m: tuple(to_device(t, rt.device) for t in windows.batch(first + m * cfg.batch_size, cfg.batch_size))
        read = lambda sums, norm: read_step(run, sums, norm, stop)
        gate = SkipGate(run.health, progress.iter_num, run.scaler.is_enabled(), read) if cfg.spike_action == "skip" else None
        sums, grad_norm = train_step(run.model, optimizer, run.scaler, autocast(rt.device, rt.dtype), get_batch, rt.accum,
                                     clip_params, cfg.grad_clip, run.no_sync, gate)
        progress.data_position += cfg.gradient_accumulation_steps * cfg.batch_size  # windows of every rank
        ce, disp, grad_norm, stopping = gate.numbers if gate else read(sums, grad_norm)
        if not math.isfinite(ce) and cfg.spike_action == "warn":  # nothing is saved: last.pt keeps the last finite state
            raise diverged(run, ce)
        progress.iter_num += 1
        progress.evaluated = False  # the new iteration's evaluation (if one is due) has not run
        step_log(progress, lr, ce, disp, grad_norm, gate and gate.skipped)
        heal(run, ce)


if __name__ == "__main__":
    run_main(main)
