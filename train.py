"""
Train a GPT on token files from data/fineweb/prepare.py. One loop: bf16 autocast, torch.compile, fused
AdamW, gradient accumulation, exact resume, and the same script under torchrun for several GPUs.

    python train.py config/train_tiny.py                       # a minute on a CPU
    python train.py config/train_fineweb_40m.py --batch_size=8  # a config file plus overrides
    python train.py config/train_tiny.py --init_from=resume     # continue exactly where last.pt stopped
    torchrun --standalone --nproc_per_node=4 train.py config/train_fineweb.py

Writes to out_dir: last.pt and best.pt (best val loss), metrics.jsonl, config.json.
Ctrl-C or SIGTERM: the current step finishes, last.pt is saved, and the run exits cleanly.
"""
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (DataError, autocast, find_checkpoint, load_checkpoint, model_from_checkpoint, open_split,
                    peak_flops, run_main, save_checkpoint, select_device, select_dtype)
from condensation import condensation_metrics
from config import ConfigError, load_train_config, model_args
from model import ARCH_KEYS, GPT, MULTIPLIER_SUFFIX, GPTConfig

# -----------------------------------------------------------------------------
# Data: training windows without replacement, validation on fixed windows


class TrainWindows:
    """Non-overlapping windows of block_size + 1 tokens, visited in a seeded shuffled order without replacement.
    Epoch e shuffles with seed (seed, e) and shifts every window by a random offset, so later epochs see new
    boundaries. `position` (windows consumed so far, over all ranks) is all a checkpoint needs to resume."""

    def __init__(self, tokens, block_size, seed):
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        self.per_epoch = (len(tokens) - 1) // block_size - 1  # so that any offset < block_size still fits
        if self.per_epoch < 1:
            raise DataError(f"the train split ({len(tokens)} tokens) is shorter than two blocks of {block_size}")
        self._epoch, self._offset, self._order = None, 0, None

    def start(self, index):
        """Token offset of the window with global index `index` (0, 1, 2, ... across epochs)."""
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._offset, self._order = epoch, int(rng.integers(self.block_size)), rng.permutation(self.per_epoch)
        return self._offset + int(self._order[i]) * self.block_size

    def batch(self, first, count):
        return stack_windows(self.tokens, [self.start(first + j) for j in range(count)], self.block_size)


def stack_windows(tokens, starts, block_size):
    """Inputs x and targets y (each (len(starts), block_size), int64) for windows starting at `starts`."""
    rows = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
    data = torch.from_numpy(rows)
    return data[:, :-1], data[:, 1:]


def fixed_windows(tokens, count, length):
    """`count` evenly spaced window starts over a split: the same tokens at every eval and in every run."""
    if len(tokens) < length + 1:
        raise DataError(f"the val split ({len(tokens)} tokens) is shorter than one window of {length}")
    return np.linspace(0, len(tokens) - length - 1, count).astype(np.int64).tolist()


def to_device(t, device):
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batch_to_device(windows, first, count, device):
    return tuple(to_device(t, device) for t in windows.batch(first, count))


# -----------------------------------------------------------------------------
# Learning-rate schedule

def get_lr(it, cfg):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters ('cosine') or constant then a linear
    decay over the last wsd_decay_frac of lr_decay_iters ('wsd'); min_lr afterwards."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_iters, cfg.lr_decay_iters - int(cfg.wsd_decay_frac * cfg.lr_decay_iters))
        if it < decay_start:
            return cfg.learning_rate
        frac = (it - decay_start) / max(1, cfg.lr_decay_iters - decay_start)
        return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)
    frac = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


# -----------------------------------------------------------------------------
# Model set-up: from scratch, from a checkpoint (ours or nanoGPT's) or from HF GPT-2

def build_model(cfg, resume_ckpt):
    args = model_args(cfg)
    if resume_ckpt is not None:  # the architecture must be the checkpoint's; training-time options may change
        saved = resume_ckpt["model_args"]
        changed = [f"{k} (config {args[k]!r}, checkpoint {saved.get(k)!r})" for k in ARCH_KEYS if saved.get(k, args[k]) != args[k]]
        if changed:
            raise ConfigError(f"cannot resume with a different architecture: {'; '.join(changed)}")
        model = GPT(GPTConfig(**{**args, **{k: saved[k] for k in ARCH_KEYS if k in saved}}))
        model.load_nanogpt_state_dict(resume_ckpt["model"])
        return model
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(**args))
    if cfg.init_from.startswith("gpt2") and not os.path.exists(cfg.init_from):
        try:
            source = GPT.from_pretrained(cfg.init_from)
        except (ImportError, OSError) as e:  # no transformers, no network, an unknown name
            raise DataError(f"cannot load {cfg.init_from} from Hugging Face: {(str(e).splitlines() or [''])[0]}")
    else:  # a checkpoint file or directory: its architecture, this config's other options, fresh multipliers
        source = model_from_checkpoint(load_checkpoint(find_checkpoint(cfg.init_from, "last")))
    source.merge_multipliers()
    model = GPT(GPTConfig(**{**args, **{k: getattr(source.config, k) for k in ARCH_KEYS if k != "multipliers"}}))
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(MULTIPLIER_SUFFIX) for k in missing), (missing, unexpected)
    return model


# -----------------------------------------------------------------------------
# One optimizer step (bench.py times this same function)

def make_optimizer(raw_model, cfg, device_type):
    return raw_model.configure_optimizer(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps,
                                         cfg.multiplier_weight_decay, cfg.multiplier_lr_scale, device_type)


def train_step(model, optimizer, scaler, ctx, get_batch, accum, clip_params, grad_clip, ddp=False):
    """Accumulate gradients over `accum` micro-batches (get_batch(i) -> x, y on the device; under DDP the
    gradients are synchronised on the last one only), clip, and step. Returns the sums over micro-batches of
    [CE, dispersion] (a device tensor: reading it waits for the GPU) and the global grad norm."""
    sums = None
    for micro in range(accum):
        x, y = get_batch(micro)  # fetched while the GPU still runs the previous micro-batch
        with model.no_sync() if ddp and micro < accum - 1 else nullcontext():
            with ctx:
                _, losses = model(x, y)
            scaler.scale(losses["loss"] / accum).backward()
        ce = losses["ce"].detach().float()
        step_sums = torch.stack([ce, losses["dispersion"].detach().float() if "dispersion" in losses else 0 * ce])
        sums = step_sums if sums is None else sums + step_sums
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


# -----------------------------------------------------------------------------
# Logging

class MetricsLog:
    """metrics.jsonl in out_dir (always) and wandb (when asked). On resume, records after the checkpoint's
    iteration are dropped, so the file shows one consistent curve."""

    def __init__(self, cfg, resume_iter):
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        kept = []
        if resume_iter is not None and os.path.exists(self.path):
            with open(self.path) as f:
                records = [json.loads(line) for line in f if line.strip().endswith("}")]  # not a line cut by a kill
            kept = [r for r in records if r["iter"] < resume_iter or r["type"] == "eval" and r["iter"] == resume_iter]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.wandb = None
        if cfg.wandb_log:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg),
                                        settings=wandb.Settings(init_timeout=60))
            except Exception as e:  # no wandb, no network, no login: train anyway
                print(f"wandb disabled: {type(e).__name__}: {e}")

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items() if k not in ("type", "iter")},
                           step=record["iter"])


# -----------------------------------------------------------------------------

def main(argv):
    cfg = load_train_config(argv)

    # --- distributed set-up, device, precision
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    device = select_device(cfg.device)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    master = rank == 0
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible by "
                          f"the number of processes ({world})")
    accum = cfg.gradient_accumulation_steps // world  # micro-batches per optimizer step on this rank
    dtype = select_dtype(cfg.dtype, device)
    device_type = device.split(":")[0]
    ctx = autocast(device, dtype)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log = print if master else (lambda *a, **k: None)

    # --- data (opened first: a wrong data_dir fails before any model is built)
    train_tokens, meta = open_split(cfg.data_dir, "train")
    val_tokens, _ = open_split(cfg.data_dir, "val")

    # --- model, optimizer, resume
    resume_ckpt = None
    if cfg.eval_only and cfg.init_from == "scratch":
        raise ConfigError("eval_only evaluates a trained model: set init_from=resume (out_dir/last.pt), a checkpoint "
                          "path or gpt2")
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "last.pt")
        if not os.path.exists(path):
            raise DataError(f"init_from=resume but there is no {path}")
        resume_ckpt = load_checkpoint(path)
        missing = [k for k in ("optimizer", "scaler", "iter_num", "data_position", "best_val_loss", "rng") if k not in resume_ckpt]
        if missing:
            raise DataError(f"{path} was not written by this train.py (no {', '.join(missing)}): start a new run from "
                            f"it with --init_from={path} instead")
    elif not cfg.eval_only and any(os.path.exists(os.path.join(cfg.out_dir, n)) for n in ("last.pt", "best.pt")):
        raise ConfigError(f"{cfg.out_dir} already holds checkpoints: continue with --init_from=resume, "
                          f"or choose another out_dir")
    raw_model = build_model(cfg, resume_ckpt).to(device)
    from_source = {k: getattr(raw_model.config, k) for k in ARCH_KEYS if getattr(raw_model.config, k) != getattr(cfg, k)}
    if from_source:  # init_from a checkpoint or GPT-2: its architecture wins, and config.json says so
        log(f"architecture of {cfg.init_from}: " + ", ".join(f"{k}={v!r} (config had {getattr(cfg, k)!r})"
                                                             for k, v in from_source.items()))
        cfg = replace(cfg, **from_source)

    # --- data windows (the architecture is final now)
    if meta["vocab_size"] > cfg.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the data's vocabulary ({meta['vocab_size']})")
    windows = TrainWindows(train_tokens, cfg.block_size, cfg.seed)
    val_starts = fixed_windows(val_tokens, cfg.eval_iters * cfg.batch_size, cfg.block_size)
    cond_len = min(512, cfg.block_size)
    cond_starts = fixed_windows(val_tokens, cfg.condensation_seqs, cond_len) if cfg.condensation_seqs else []
    val_bytes_per_token = meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps

    optimizer = make_optimizer(raw_model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    clip_params = raw_model.parameters_to_clip()
    iter_num, data_position, best_val_loss, skip_eval_at = 0, 0, float("inf"), None
    if resume_ckpt is not None:
        wanted = [{k: g[k] for k in ("weight_decay", "lr_scale", "betas", "eps")} for g in optimizer.param_groups]
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        for group, settings in zip(optimizer.param_groups, wanted):  # this run's settings, not the checkpoint's
            group.update(settings)
        scaler.load_state_dict(resume_ckpt["scaler"])
        iter_num, data_position = resume_ckpt["iter_num"], resume_ckpt["data_position"]
        best_val_loss = resume_ckpt["best_val_loss"]
        if resume_ckpt.get("evaluated", True) and not cfg.eval_only:  # the stopped run evaluated its last iteration
            skip_eval_at = iter_num
        torch.set_rng_state(resume_ckpt["rng"]["torch"])
        if "cuda" in resume_ckpt["rng"] and device_type == "cuda":
            torch.cuda.set_rng_state(resume_ckpt["rng"]["cuda"])
        del resume_ckpt  # free the memory it holds
    start_iter = iter_num
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    flops_peak = peak_flops(device, cfg.peak_flops)

    if master and not cfg.eval_only:  # eval_only prints its result and writes nothing
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    if master:
        log("config: " + ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))
        log(f"device {device}, dtype {dtype}, {world} process(es), compile {cfg.compile}")
        log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters (position embeddings not counted); "
            f"{raw_model.flops_per_token() / 1e6:.0f} MFLOPs per token")
        log(f"tokens per step: {cfg.batch_size} batch x {cfg.block_size} block x {cfg.gradient_accumulation_steps} "
            f"accumulation = {tokens_per_step:,} ({accum} micro-batches per process); train split "
            f"{len(train_tokens):,} tokens = {len(train_tokens) / tokens_per_step:.1f} steps per epoch")
        if flops_peak is None and device_type == "cuda":
            log("MFU not reported: unknown GPU peak FLOP/s (set peak_flops)")
        if start_iter:
            log(f"resumed from {cfg.out_dir}/last.pt at iter {start_iter} (best val loss {best_val_loss:.4f})")
    metrics = MetricsLog(cfg, start_iter if cfg.init_from == "resume" else None) if master and not cfg.eval_only else None

    # --- helpers that use the state above
    @torch.no_grad()
    def evaluate():
        """Mean CE over the fixed validation windows (spread over ranks), bits per byte, condensation."""
        model.eval()
        total = torch.zeros(2, device=device, dtype=torch.float64)  # sum of window losses, window count
        for b in range(rank, cfg.eval_iters, world):
            x, y = stack_windows(val_tokens, val_starts[b * cfg.batch_size:(b + 1) * cfg.batch_size], cfg.block_size)
            with ctx:
                _, losses = model(to_device(x, device), to_device(y, device))
            total += torch.stack([losses["ce"].double() * x.size(0), torch.tensor(x.size(0), device=device, dtype=torch.float64)])
        if ddp:
            dist.all_reduce(total)
        model.train()
        val_loss = (total[0] / total[1]).item()
        if not math.isfinite(val_loss):
            raise DataError(f"val loss is {val_loss} at iter {iter_num}: stopped without saving")
        result = {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / val_bytes_per_token}
        if cond_starts and master:
            x, _ = stack_windows(val_tokens, cond_starts, cond_len)
            with ctx:
                result.update(condensation_metrics(raw_model, to_device(x, device)))
        return result

    def checkpoint(name):
        save_checkpoint({
            "format": "gpt-checkpoint", "version": 1, "model_args": asdict(raw_model.config),
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "config": asdict(cfg), "iter_num": iter_num, "best_val_loss": best_val_loss,
            "data_position": data_position, "tokens_seen": data_position * cfg.block_size, "evaluated": evaluated,
            "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {})},
        }, os.path.join(cfg.out_dir, name))

    stop_signal = []  # set by Ctrl-C / SIGTERM; acted on only once all ranks agree, after a step

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once
        log(f"\n{signal.Signals(signum).name}: finishing this step, then saving {cfg.out_dir}/last.pt")

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # --- the training loop
    stopping, steps_timed, t0 = False, 0, time.time()
    while True:
        # evaluate and checkpoint every eval_interval steps and at the end. A stop request saves without
        # evaluating; the checkpoint records whether this iteration's evaluation ran, so a resumed run does it
        # if it did not (and does not repeat it if it did).
        done = iter_num >= cfg.max_iters or stopping
        evaluated = False
        due = done or cfg.eval_only or iter_num % cfg.eval_interval == 0
        if due and not stopping and iter_num != skip_eval_at:
            result = evaluate()
            evaluated = True
            if master:
                log(f"eval {iter_num}: val loss {result['val_loss']:.4f} | val bpb {result['val_bpb']:.4f}"
                    + (f" | condensation spearman {result['cond/spearman']:+.2f}" if "cond/spearman" in result else ""))
                if metrics is not None:
                    metrics.write({"type": "eval", "iter": iter_num, **result})
                if result["val_loss"] < best_val_loss:
                    best_val_loss = result["val_loss"]
                    if iter_num > 0 and not cfg.eval_only:
                        checkpoint("best.pt")
        if not ddp and stop_signal:  # one process: a Ctrl-C during the evaluation saves now, not after one more step
            stopping = done = True
        if master and iter_num > 0 and not cfg.eval_only and (done or evaluated and cfg.always_save_checkpoint):
            checkpoint("last.pt")
            if done:
                log(f"saved {cfg.out_dir}/last.pt at iter {iter_num}")
        if done or cfg.eval_only:
            break

        # one optimizer step: accum micro-batches on each rank, gradients synchronised on the last one
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        first = data_position + rank * accum * cfg.batch_size  # this rank's windows of the step
        sums, grad_norm = train_step(model, optimizer, scaler, ctx,
                                     lambda m: batch_to_device(windows, first + m * cfg.batch_size, cfg.batch_size, device),
                                     accum, clip_params, cfg.grad_clip, ddp)
        data_position += cfg.gradient_accumulation_steps * cfg.batch_size

        # the true mean over every micro-batch of every rank; .tolist() waits for the GPU once per step
        sums = torch.cat([sums, torch.tensor([float(bool(stop_signal))], device=device)])  # + stop votes
        if ddp:
            dist.all_reduce(sums)
        ce, disp, stop_votes = sums.tolist()
        ce, disp, stopping = ce / cfg.gradient_accumulation_steps, disp / cfg.gradient_accumulation_steps, stop_votes > 0
        if not math.isfinite(ce):
            last = os.path.join(cfg.out_dir, "last.pt")
            raise DataError(f"loss is {ce} at iter {iter_num}: stopped without saving (last good checkpoint: "
                                     f"{last if os.path.exists(last) else 'none yet'}); try a lower learning_rate")
        iter_num += 1
        steps_timed += 1
        if master and (iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters):
            dt = (time.time() - t0) / steps_timed
            tok_s = tokens_per_step / dt
            record = {"type": "train", "iter": iter_num - 1, "loss": ce, "lr": lr, "grad_norm": grad_norm.item(),
                      "ms": 1000 * dt, "tok_s": tok_s, "tokens": data_position * cfg.block_size}
            line = (f"iter {iter_num - 1:6d} | loss {ce:.4f} | lr {lr:.2e} | norm {record['grad_norm']:6.3f} | "
                    f"{1000 * dt:8.1f} ms | {tok_s:9,.0f} tok/s")
            if flops_peak:
                record["mfu"] = raw_model.flops_per_token() * tok_s / flops_peak
                line += f" | mfu {100 * record['mfu']:5.1f}%"
            if raw_model.config.dispersion_coeff > 0:
                record["dispersion"] = disp
                line += f" | disp {disp:.4f}"
            record.update(raw_model.multiplier_stats())
            log(line)
            metrics.write(record)
            steps_timed, t0 = 0, time.time()

    if ddp:  # wait for rank 0's checkpoint write: a rank tearing gloo down early can abort its peers
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
