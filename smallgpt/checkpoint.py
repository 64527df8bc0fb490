"""
Checkpoints: atomic writing, finding one in a run directory, and the one loader that train.py, sample.py,
condensation.py and the other scripts share (ours and nanoGPT's ckpt.pt), plus the code version that every
run records.
"""
import functools
import os
import pickle
import re
import subprocess
from dataclasses import fields

import torch

from model import GPT, GPTConfig
from .errors import ConfigError, DataError

# -----------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and Python types, so torch.load(weights_only=True) reads them.
# Ours hold: format, model_args (GPTConfig), model, optimizer, scaler, config, iter_num, best_val_loss,
# rng, data_position, evaluated (whether iter_num's evaluation ran).
# nanoGPT's ckpt.pt holds model_args, model, optimizer, config, iter_num, best_val_loss.

CHECKPOINT_NAMES = {"best": "best.pt", "last": "last.pt"}


def save_checkpoint(obj, path):
    """Write atomically: a kill mid-write leaves the previous file at path intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    raise DataError(f"no checkpoint (best.pt, last.pt or ckpt.pt) in {path}")


def load_checkpoint(path, device="cpu"):
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False: never run a pickle we cannot read
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise DataError(f"cannot load checkpoint {path}: " + (
            f"it holds a Python object ({found[1]}) that this code never unpickles (that could run code)" if found
            else "not a PyTorch checkpoint, or truncated or corrupt"))
    except Exception as e:  # truncated, empty, not a checkpoint
        detail = (str(e).splitlines() or [""])[0]
        raise DataError(f"cannot load checkpoint {path}: not a PyTorch checkpoint, or truncated or corrupt "
                        f"({type(e).__name__}{': ' + detail if detail else ''})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
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
