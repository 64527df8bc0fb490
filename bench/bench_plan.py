"""
The planner (smallgpt/plan.py, `train.py --plan`) against measurement, for any train.py config:

    python -m bench.bench_plan config/train_tiny.py                                          # seconds on a CPU
    python -m bench.bench_plan config/train_fineweb_40m.py --block_size=256 --batch_size=8 --dtype=bfloat16
    python -m bench.bench_plan config/train_fineweb.py --device=cuda    # on a GPU also torch.cuda.max_memory_allocated

With the model and optimizer train.py builds and train.py's own train_step, in eager mode (compile is not used),
on random tokens, it measures:
- weights, gradients and optimizer state: the bytes of the tensors after a real step (each storage once);
- the first micro-batch after a step: what its forward leaves saved for backward, its forward and backward peaks;
- a whole steady-state step (the optimizer state exists) of at most 2 micro-batches: its peak of live tensors;
each beside the planner's figure, with the ratio planned / measured. Live tensor bytes are counted by LiveTensors
(below): every storage an op creates, until it is freed, on any device; it does not see the CUDA context, the
allocator's rounding and caching, or scratch memory a kernel frees before it returns. On CUDA the step's
torch.cuda.max_memory_allocated is reported too, against the planner's peak (weights and optimizer state included).
"""
import gc
import os
import sys
import weakref
from dataclasses import replace

if not __package__:  # run as a file, the repository root is not on the path: say how to run it
    sys.exit(f"run it from the repository root as: python -m bench.{os.path.basename(__file__)[:-3]} ...")

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from bench.bench_train import GPT2_VOCAB
from smallgpt.config import TrainConfig, parse_args, validate, with_vocab_size
from smallgpt.device import autocast, select_device, select_dtype
from smallgpt.errors import ConfigError, run_main
from smallgpt.optim import configure_optimizer
from smallgpt.plan import Dims, meta_model, micro_batch, plan_dtype, step_memory
from train import build_model, train_step

MIB = 2 ** 20
MAX_MICRO_BATCHES = 2  # per measured step: the second finds the gradients allocated, as every later one does


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while the mode is on, and their peak. Autograd carries the
    mode into backward, so backward's tensors count too. A storage counts once (a view or an in-place result
    shares its input's) and until it dies: a weakref on the storage's Python object, which PyTorch keeps alive
    exactly as long as the storage itself, so a tensor that only the autograd graph holds still counts.
    Storages alive before the mode starts (weights, optimizer state, the batch) are the baseline: not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}  # id(storage) -> weakref

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = set()
        tree_map_only(torch.Tensor, lambda t: inputs.add(t.untyped_storage()._cdata), (args, kwargs))
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, lambda t: self.track(t.untyped_storage(), inputs), out)
        self.peak = max(self.peak, self.live)
        return out

    def track(self, storage, inputs):
        key = id(storage)
        ref = self.refs.get(key)
        if storage._cdata in inputs or (ref is not None and ref() is storage):  # not new memory
            return
        self.refs[key] = weakref.ref(storage, lambda _, key=key, n=storage.nbytes(): self.freed(key, n))
        self.live += storage.nbytes()

    def freed(self, key, nbytes):
        self.live -= nbytes
        self.refs.pop(key, None)


def storage_bytes(tensors):
    """Bytes of the distinct storages of tensors (Q, K and V's gradients share one: counted once)."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


class Trainer:
    """A model, its optimizer and random micro-batches, as train.py builds and steps them (eager)."""

    def __init__(self, cfg, device, dtype):
        self.cfg, self.device, self.ctx = cfg, device, autocast(device, dtype)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, None).to(device)
        self.optimizer = configure_optimizer(self.model, cfg, device.split(":")[0], dtype)
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
        self.accum = min(cfg.gradient_accumulation_steps, MAX_MICRO_BATCHES)
        vocab = min(cfg.vocab_size, 50257)
        self.batches = [torch.randint(vocab, (cfg.batch_size, cfg.block_size + 1)).to(device) for _ in range(self.accum)]

    def get_batch(self, micro):
        return self.batches[micro][:, :-1], self.batches[micro][:, 1:]

    def step(self):
        train_step(self.model, self.optimizer, self.scaler, self.ctx, self.get_batch, self.accum,
                   self.model.parameters_to_clip(), self.cfg.grad_clip)

    def state_tensors(self):
        return [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


def measure(cfg, device, dtype):
    """The measured figures (bytes) of cfg: after one step (the optimizer state exists), a first micro-batch
    alone, then a whole step."""
    run = Trainer(cfg, device, dtype)
    run.step()
    got = {"weights": storage_bytes(run.model.parameters()), "optimizer state": storage_bytes(run.state_tensors())}
    x, y = run.get_batch(0)
    gc.collect()
    with LiveTensors() as live:
        with run.ctx:
            _, losses = run.model(x, y)
        loss = losses.pop("loss") / run.accum
        losses.clear()
        got["saved by micro-batch 1"] = live.live - loss.untyped_storage().nbytes()  # the loss: 4 bytes
        got["forward peak"], live.peak = live.peak, live.live
        loss.backward()
        got["backward peak"] = live.peak
        del loss
    got["gradients"] = storage_bytes(p.grad for p in run.model.parameters() if p.grad is not None)
    run.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    with LiveTensors() as live:
        run.step()
    got["step peak above weights + state"] = live.peak
    if cuda:
        got["step peak, max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return got


def planned(cfg):
    """The planner's figures for what measure() measures (bytes)."""
    model = meta_model(cfg)
    mem = step_memory(cfg, cfg.batch_size, model)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    _, (forward, _), (backward, _) = micro_batch(Dims.of(cfg, plan_dtype(cfg)), cfg.batch_size * cfg.block_size,
                                                 block, params, grads_exist=False)
    state = sum(mem.optimizer.values())
    return {"weights": mem.weights, "gradients": mem.gradients, "optimizer state": state,
            "saved by micro-batch 1": mem.activations, "forward peak": forward, "backward peak": backward,
            "step peak above weights + state": mem.peak - mem.weights - state,
            "step peak, max_memory_allocated": mem.peak, "where": mem.where}


def compare(cfg):
    """cfg resolved for this machine: (rows of (what, planned bytes, measured bytes), device, dtype)."""
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    # the micro-batches a measured step takes, and the dtype it really runs in, for the plan too
    cfg = replace(cfg, dtype=dtype, gradient_accumulation_steps=min(cfg.gradient_accumulation_steps, MAX_MICRO_BATCHES))
    plan, got = planned(cfg), measure(cfg, device, dtype)
    return [(what, plan[what], got[what]) for what in got], plan["where"], device, dtype


def main(argv):
    cfg = with_vocab_size(validate(parse_args(TrainConfig, argv)), GPT2_VOCAB)  # vocab_size 0: GPT-2's, padded
    if cfg.batch_size == "auto":
        raise ConfigError("bench_plan measures a given micro-batch: set batch_size to a number")
    rows, where, device, dtype = compare(cfg)
    print(f"{cfg.n_layer} x {cfg.n_embd}, micro-batch {cfg.batch_size} x {cfg.block_size}, {dtype}, {device}, "
          f"activation checkpointing {cfg.activation_checkpointing}, {cfg.optimizer}, eager; the plan's step peak "
          f"is at {where}")
    print(f"{'':34s} {'planned MiB':>12s} {'measured MiB':>13s} {'ratio':>7s}")
    for what, plan, got in rows:
        print(f"{what:34s} {plan / MIB:12.2f} {got / MIB:13.2f} {plan / got if got else float('nan'):7.3f}")


if __name__ == "__main__":
    run_main(main)
