"""
Checkpoints: atomic writing (a full disk is one line), finding one in a run directory, and the one loader that
train.py, sample.py, condensation.py and the other scripts share (ours and nanoGPT's ckpt.pt); the run
directory's lock (one trainer at a time) and its clean-up after a kill; the code version that every run records.
"""
import functools
import glob
import os
import pickle
import re
import shutil
import socket
import subprocess
from dataclasses import fields

import torch

from model import GPT, GPTConfig
from .errors import ConfigError, DataError, out_of_space
from .monitor import file_size

# -----------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and Python types, so torch.load(weights_only=True) reads them.
# Ours hold: format, model_args (GPTConfig), model, optimizer, scaler, config, iter_num, best_val_loss,
# rng, data_position, evaluated (whether iter_num's evaluation ran).
# nanoGPT's ckpt.pt holds model_args, model, optimizer, config, iter_num, best_val_loss.

CHECKPOINT_NAMES = {"best": "best.pt", "last": "last.pt"}
SHARDED_DIR = "sharded"  # in a run directory: the sharded checkpoints of parallel='fsdp' (smallgpt/parallel.py)


def save_checkpoint(obj, path):
    """Write atomically: a kill mid-write leaves the previous file at path intact (and at worst a stale
    path.tmp, which train.py removes at its next start). A failed write removes its temporary; on a full disk
    the error is one line naming the file and the space it needs."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave an empty file at path
    except BaseException as e:  # a full disk, a second Ctrl-C: never leave a partial temporary filling the disk
        if os.path.exists(tmp):
            os.remove(tmp)
        if out_of_space(e):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            kept = f"the previous {os.path.basename(path)} is untouched" if os.path.exists(path) else "nothing written"
            raise DataError(f"cannot write {path}: no space left on the device (it needs about "
                            f"{file_size(tensor_bytes(obj))}, {file_size(free)} free); {kept}") from None
        raise
    os.replace(tmp, path)


def tensor_bytes(obj):
    """Bytes of the tensors in a nested dict / list: about the size of its checkpoint file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in values)


def check_which(which):
    """The scripts' --which, checked at start-up (and by find_checkpoint): 'best' or 'last'."""
    if which not in CHECKPOINT_NAMES:
        raise ConfigError(f"which must be best or last, not {which!r}")
    return which


def find_checkpoint(path, which="best"):
    """A checkpoint file: path itself, or in directory path: best.pt / last.pt (which), else nanoGPT's ckpt.pt."""
    check_which(which)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise DataError(f"no such checkpoint or directory: {path}")
    order = [CHECKPOINT_NAMES[which]] + [n for n in ("best.pt", "last.pt", "ckpt.pt") if n != CHECKPOINT_NAMES[which]]
    for name in order:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    if os.path.isdir(os.path.join(path, SHARDED_DIR)):  # an FSDP run stopped before it wrote its single files
        raise DataError(f"no checkpoint file in {path}, only sharded ones: make one with "
                        f"python consolidate.py --out_dir={path} --which={which}")
    raise DataError(f"no checkpoint (best.pt, last.pt or ckpt.pt) in {path}")


def newest_checkpoint(out_dir):
    """The newer of out_dir's last.pt and best.pt, or None: both hold a run's full training state (last.pt on a
    tie). mmap: only the iterations are read, not the tensors."""
    paths = [os.path.join(out_dir, n) for n in ("last.pt", "best.pt") if os.path.exists(os.path.join(out_dir, n))]
    # max() keeps the first of equals: last.pt
    return max(paths, key=lambda p: load_checkpoint(p, mmap=True).get("iter_num", -1), default=None)


def load_checkpoint(path, device="cpu", mmap=False, need_model=True):
    """A checkpoint as a dict (checked to hold a model; need_model=False: a sharded checkpoint's state.pt, its
    weights beside it). mmap=True reads tensors only when touched: a cheap look at a checkpoint's iter_num and
    records."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False: never run a pickle we cannot read
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise DataError(f"cannot load checkpoint {path}: " + (
            f"it holds a Python object ({found[1]}) that this code never unpickles (that could run code)" if found
            else "not a PyTorch checkpoint, or truncated or corrupt"))
    except Exception as e:  # truncated, empty, not a checkpoint
        detail = (str(e).splitlines() or [""])[0]
        raise DataError(f"cannot load checkpoint {path}: not a PyTorch checkpoint, or truncated or corrupt "
                        f"({type(e).__name__}{': ' + detail if detail else ''})")
    if not isinstance(ckpt, dict) or (need_model and "model" not in ckpt) or "model_args" not in ckpt:
        raise DataError(f"{path} is not a GPT checkpoint (no 'model' / 'model_args')")
    ckpt["model_args"].setdefault("token_multipliers", False)  # checkpoints older than the key had none
    return ckpt


def model_from_checkpoint(ckpt):
    """Build the GPT described by a checkpoint (ours or nanoGPT's) and load its weights (on CPU)."""
    known = {f.name for f in fields(GPTConfig)}
    unknown = set(ckpt["model_args"]) - known
    if unknown:
        raise DataError(f"checkpoint has model settings this code does not know: {', '.join(sorted(unknown))}")
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_nanogpt_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as e:
        raise DataError(f"checkpoint does not match its model settings: {str(e).splitlines()[0]}")
    return model


# -----------------------------------------------------------------------------
# The run directory: one trainer at a time

def lock_run_dir(out_dir):
    """Hold out_dir for this process: a second train.py in the same directory stops with one line naming the
    first. The lock is the kernel's flock on out_dir/train.lock, so it dies with its process, kill -9 included:
    no stale lock to delete by hand. Returns the open lock file: keep it open while the run goes on. Where
    flock does not exist (Windows) or the filesystem refuses it, the run goes on unlocked, with a warning."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "train.lock")
    lock = open(path, "a+")
    try:
        import fcntl  # POSIX only
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "its pid not written yet"
        lock.close()
        raise DataError(f"{out_dir} is in use by another train.py ({holder}); two runs writing one out_dir would "
                        f"overwrite each other's checkpoints: wait for it, stop it, or choose another out_dir")
    except (ImportError, OSError) as e:
        print(f"warning: {path} cannot be locked ({type(e).__name__}: {e}): nothing stops a second train.py from "
              f"writing into {out_dir} at the same time")
        return lock
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")  # for the message above
    lock.flush()
    return lock


def remove_stale_temporaries(out_dir):
    """Delete the *.pt.tmp files that a killed run left in out_dir (one checkpoint's size each); returns a line
    naming them, or None. Call it only while holding out_dir's lock: a running trainer's temporary is not stale."""
    stale = sorted(glob.glob(os.path.join(glob.escape(out_dir), "*.pt.tmp")))
    sizes = [os.path.getsize(p) for p in stale]
    for p in stale:
        os.remove(p)
    if not stale:
        return None
    return (f"removed {', '.join(os.path.basename(p) for p in stale)} ({file_size(sum(sizes))}): the unfinished "
            f"checkpoint write of a run that was killed")


@functools.cache  # asked once per process: every checkpoint write records it, and git takes milliseconds
def code_version():
    """The git commit of this code and whether the tree had uncommitted changes, e.g. '97b21d9 (dirty)'; or
    'unknown' outside a git checkout. Recorded in config.json and every checkpoint, printed at start."""
    repo = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git installed
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + (" (dirty)" if status.stdout.strip() else "")
