"""
FSDP: one model trained over the processes that torchrun starts, each holding 1/world of every parameter, of its
gradient and of its optimizer state (train.py's parallel='fsdp'; 'ddp', the default, keeps a whole copy on every
GPU). PyTorch's engine does the work: FSDP2 (torch.distributed.fsdp.fully_shard) shards the model and
torch.distributed.checkpoint (DCP) writes and reads the shards. This module holds what train.py needs of them:

- shard_model: each block, then the root (embedding, tied LM head, final norm, embedding multipliers), as FSDP
  units; with bf16 or fp16 training the units gather their weights in that dtype and reduce gradients in float32;
- no_gradient_sync: gradient accumulation that reduce-scatters only after the last micro-batch;
- full_parameters: a window in which every rank holds the whole model, for what reads weights outside a
  synchronised forward (the statistics, evaluation split unevenly over the ranks, rank 0's condensation probe);
- sharded checkpoints: written by every rank in parallel, published atomically, read back under any number of
  processes, sharded or not; a single-file optimizer state made this rank's shards (resuming a file under FSDP);
- consolidate: a sharded checkpoint -> the usual single file (consolidate.py; train.py at the end of a run).

Sharded checkpoints live in out_dir/sharded/:
    iter-000500/            .metadata and __<rank>_0.distcp: the model and optimizer state (DCP's files)
    iter-000500/state.pt    the rest of a checkpoint: config, model_args, progress, RNG, scaler (rank 0's)
    last, best, stable      pointer files: the name of the directory each checkpoint is (replaced atomically)
"""
import os
import shutil
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from model import GPT, GPTConfig
from .checkpoint import SHARDED_DIR, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import ConfigError, DataError
from .optim import MuonAdamW, configure_optimizer

# -----------------------------------------------------------------------------
# Sharding the model and training it

def shard_model(model, device, dtype):
    """Shard model (built on the CPU, the same weights on every rank: fully_shard splits what each rank holds, it
    does not broadcast) over the default process group. Each block is a unit, then the root, so that the tied
    embedding and LM head share one unit (FSDP cannot split a tied parameter over two) whose forward runs (the
    chunked loss reads the head's weight without calling lm_head). The units move to device one at a time: no rank
    holds more than one unit's full weights. Where training autocasts (bf16, fp16), the units all-gather their
    weights in that dtype and reduce gradients in float32; master weights and optimizer state stay float32.
    Returns model itself, now an FSDP module: its parameters are DTensors, their names (and checkpoint keys)
    unchanged. Build the optimizer afterwards: parameters taken before sharding are stale, silently."""
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    policy = MixedPrecisionPolicy() if dtype == "float32" else MixedPrecisionPolicy(
        param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextmanager
def no_gradient_sync(model):
    """FSDP's counterpart of DDP's no_sync(): the backward passes inside keep their gradients whole (one unsharded
    float32 copy of the model's gradients, on every rank); the first backward after reduce-scatters the sum."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextmanager
def full_parameters(model):
    """Inside, every rank holds model's whole weights (one all-gather per unit on entry, in the training dtype)
    and its forwards communicate nothing. So ranks may run different numbers of forwards (evaluation batches and
    HellaSwag items split unevenly), one rank may run some alone (the condensation probe), and methods that read
    parameters outside forward (weight_norms, multiplier_stats, hidden_states) work. Every rank must enter and
    leave together. For a model that is not sharded nothing happens."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # forwards inside leave the weights gathered
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


# -----------------------------------------------------------------------------
# Sharded checkpoints

POINTERS = ("last", "best", "stable")  # train.py's last.pt, best.pt and stable.pt

def torch_optimizers(optimizer):
    """The torch optimizers of train.py's optimizer (what DCP's state-dict functions take)."""
    return optimizer.optimizers if isinstance(optimizer, MuonAdamW) else (optimizer,)


def save_sharded(out_dir, names, model, optimizer, contents):
    """Write one sharded checkpoint and point each of names ('last', 'best', 'stable') at it: model and
    optimizer state through DCP, each rank its own shards, in parallel; `contents` (the rest of a checkpoint,
    rank 0's) as state.pt beside them. Every rank must call it. A kill at any moment leaves every pointer naming a
    complete checkpoint: DCP writes into save.tmp, and only once every rank is done does rank 0 rename it and then
    replace the pointers (os.replace, atomic); directories that no pointer names are deleted afterwards."""
    root = os.path.join(out_dir, SHARDED_DIR)
    tmp, master = os.path.join(root, "save.tmp"), dist.get_rank() == 0
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
        os.makedirs(root, exist_ok=True)
    dist.barrier()  # nobody writes into the old save.tmp
    model_state, optimizer_state = get_state_dict(model, torch_optimizers(optimizer))  # this rank's shards
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if master:
        # the optimizer's own counter (MuonAdamW's momentum warm-up) is not in the torch optimizers' state
        steps = getattr(optimizer, "steps", None)
        save_checkpoint({**contents, "optimizer_steps": steps}, os.path.join(tmp, "state.pt"))
        name = unused_name(root, f"iter-{contents['iter_num']:06d}")
        os.replace(tmp, os.path.join(root, name))  # complete now: a directory rename is atomic
        for pointer in names:
            write_atomically(os.path.join(root, pointer), name)
        named = {read_pointer(root, p) for p in POINTERS if os.path.isfile(os.path.join(root, p))}
        for old in os.listdir(root):
            if old.startswith("iter-") and old not in named:
                shutil.rmtree(os.path.join(root, old))
    dist.barrier()  # the pointers are in place before any rank goes on (or reads them)


def unused_name(root, name):
    """name, or name-2, name-3...: a resumed run may save the same iteration again (after a stop, or from stable)."""
    taken, n = set(os.listdir(root)), 1
    while (candidate := name if n == 1 else f"{name}-{n}") in taken:
        n += 1
    return candidate


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_pointer(root, pointer):
    with open(os.path.join(root, pointer)) as f:
        return f.read().strip()


def read_sharded(out_dir, name="last"):
    """The sharded checkpoint `name` of a run: its state.pt (config, model_args, progress...) with 'sharded' (its
    directory) and 'path' (for messages); None when the run has none."""
    root = os.path.join(out_dir, SHARDED_DIR)
    if not os.path.isfile(os.path.join(root, name)):
        return None
    directory = os.path.join(root, read_pointer(root, name))
    state = load_checkpoint(os.path.join(directory, "state.pt"), need_model=False)
    return {**state, "sharded": directory, "path": directory}


def load_sharded(ckpt, model, optimizer, single_process=False):
    """Fill model and optimizer, built for this run (sharded or not, under any number of processes), from the
    sharded checkpoint ckpt (read_sharded's): DCP reads each rank's part of every tensor, whatever sharding wrote
    it. The param groups' settings are the checkpoint's afterwards (train.py's restore puts this run's back)."""
    optimizers = torch_optimizers(optimizer)
    # the destination: this run's state dicts (get_state_dict first creates the optimizer state by a zero-lr step)
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes what we ask of it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt["sharded"], no_dist=single_process or not dist.is_initialized())
    except CheckpointException as e:  # a BaseException: a missing or damaged file, a shape this model lacks
        raise DataError(f"cannot read the sharded checkpoint {ckpt['sharded']}: {first_line(e)}")
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ckpt.get("optimizer_steps") is not None:
        optimizer.steps = ckpt["optimizer_steps"]


def first_line(error):
    """The cause in one line; DCP's exception carries each failed rank's (exception, traceback)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def shard_optimizer_state(state, optimizer):
    """A single-file checkpoint's optimizer state (whole tensors) for an optimizer over FSDP's sharded parameters:
    every tensor shaped like its parameter becomes this rank's part of it, split as the parameter is (no
    communication: every rank read the file). Plain parameters (one process, DDP): unchanged."""
    muon_adamw = isinstance(optimizer, MuonAdamW)
    parts = zip((state["muon"], state["adamw"]), optimizer.optimizers) if muon_adamw else [(state, optimizer)]
    for part, torch_optimizer in parts:
        params = [p for group in torch_optimizer.param_groups for p in group["params"]]  # torch numbers them so
        for i, tensors in part["state"].items():
            p = params[i]
            if isinstance(p, DTensor):
                part["state"][i] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                                    if torch.is_tensor(v) and v.shape == p.shape else v for k, v in tensors.items()}
    return state


def consolidate(out_dir, name, path):
    """The sharded checkpoint `name` of out_dir as the usual single file at path (what one process saves: it loads
    in sample.py, serve.py, eval.py, export.py, and resumes a run in one process or under DDP). One process, no
    process group needed (rank 0 alone at the end of an FSDP run): the whole model and optimizer state pass
    through CPU memory. Returns the checkpoint's iteration."""
    ckpt = read_sharded(out_dir, name)
    if ckpt is None:
        raise DataError(f"no sharded checkpoint '{name}' in {os.path.join(out_dir, SHARDED_DIR)}")
    if os.path.isfile(path) and load_checkpoint(path).get("iter_num", -1) > ckpt["iter_num"]:
        raise ConfigError(f"{path} holds a later state than the sharded checkpoint (iter {ckpt['iter_num']}), "
                          f"from a run continued without FSDP: write elsewhere (consolidate.py --out)")
    try:
        cfg = TrainConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise DataError(f"{ckpt['path']}: its config does not load in this code ({first_line(e)})")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    optimizer = configure_optimizer(model, cfg, "cpu")
    load_sharded(ckpt, model, optimizer, single_process=True)
    contents = {k: v for k, v in ckpt.items() if k not in ("sharded", "path", "optimizer_steps")}
    save_checkpoint({**contents, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return ckpt["iter_num"]
