"""
Helpers shared by train.py, sample.py, bench.py and data/fineweb/prepare.py:
- the token-file format (train.bin / val.bin / meta.json) that prepare.py writes and train.py reads,
- the GPT-2 tokenizer,
- device and dtype selection,
- atomic checkpoint writing and the one checkpoint loader.
torch is imported inside the functions that use it: prepare.py needs only the token format and the tokenizer,
and importing torch would add ~1.5 s and ~220 MB to every prepare.py run.
"""
import json
import os
import sys
from contextlib import nullcontext

import numpy as np

# -----------------------------------------------------------------------------
# Token files: a directory with train.bin, val.bin (raw little-endian uint16 tokens, documents
# separated by the EOT token) and meta.json describing them. Bumping FORMAT_VERSION makes old
# directories fail loudly instead of being misread.

TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50,257 ids fit in uint16
FORMAT_NAME = "gpt-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DataError(Exception):
    """A problem with user-supplied data or files (or a diverged run): printed as one line, no traceback."""


def run_main(main):
    """Run a script's main(argv). The user's mistakes (a bad config, missing data, a bad checkpoint) end with
    one line on stderr and exit status 1, not a traceback."""
    from config import ConfigError  # config.py imports model.py; only scripts need this
    name = os.path.basename(sys.argv[0])
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"{name}: config error: {e}")
    except DataError as e:
        sys.exit(f"{name}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"\n{name}: interrupted")
    except BrokenPipeError:  # e.g. `python sample.py | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(1)
    except OSError as e:  # an unwritable out_dir, a full disk, no network: the message names the path or host
        sys.exit(f"{name}: error: {e}")


def read_meta(data_dir):
    """Read and check data_dir/meta.json; raise DataError with a clear message if unusable."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"no token data in {data_dir!r} (missing meta.json): run data/fineweb/prepare.py first")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is unreadable ({e}): re-run prepare.py")
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not a prepare.py meta.json: re-run prepare.py")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, "
                        f"found {meta.get('format')!r} version {meta.get('version')!r}; re-run prepare.py")
    try:  # the fields the training scripts read
        meta["vocab_size"]
        for split in SPLITS:
            meta["splits"][split]["tokens"], meta["splits"][split]["bytes"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path} lacks the field {e}: re-run prepare.py")
    return meta


def open_split(data_dir, split):
    """Memory-map one split's tokens (read-only, nothing loaded into RAM). Returns (tokens, meta)."""
    meta = read_meta(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise DataError(f"missing {path}")
    expected = meta["splits"][split]["tokens"]
    if expected == 0:
        raise DataError(f"the {split} split in {data_dir} is empty: re-run prepare.py with more documents or --val_docs")
    actual = os.path.getsize(path) // TOKEN_DTYPE.itemsize
    if actual != expected:
        raise DataError(f"{path} holds {actual} tokens but meta.json says {expected}: re-run prepare.py")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r"), meta


# -----------------------------------------------------------------------------
# Tokenizer

# tiktoken's cache names each file by the sha1 of its download URL (see ../shared/README.md)
TIKTOKEN_CACHE_NAMES = {"vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                        "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
                        "gpt2.tiktoken": "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"}


def seed_tiktoken_cache(files_dir):
    """Offline machines (the tests, the benchmarks here): copy GPT-2's BPE files from files_dir into a cache
    directory under the names tiktoken looks for, and point TIKTOKEN_CACHE_DIR there (unless already set)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    import shutil
    import tempfile
    cache = os.path.join(tempfile.gettempdir(), f"tiktoken-cache-{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    for name, cached_name in TIKTOKEN_CACHE_NAMES.items():
        target = os.path.join(cache, cached_name)
        if not os.path.exists(target) and os.path.exists(os.path.join(files_dir, name)):
            shutil.copyfile(os.path.join(files_dir, name), target)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache


def get_tokenizer():
    """GPT-2 BPE via tiktoken (downloads its files once into tiktoken's cache, or uses TIKTOKEN_CACHE_DIR)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached files: one line, not a requests traceback
        raise DataError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads it once; offline, "
                        f"point TIKTOKEN_CACHE_DIR at a directory holding its files") from e


# -----------------------------------------------------------------------------
# Device and precision

def select_device(device="auto"):
    """The device to run on; a device name this machine cannot use is a config error, not a traceback."""
    import torch
    from config import ConfigError
    if device != "auto":
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"device {device!r} is not a device name: use auto, cpu, cuda, cuda:1 or mps")
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(parsed.type, False) or parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} is not available on this machine")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def select_dtype(dtype, device):
    """'auto': bfloat16 on GPUs that support it, float16 on older CUDA GPUs, float32 on CPU and MPS."""
    import torch
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast(device, dtype):
    """Mixed-precision context for the forward pass (a no-op in float32)."""
    import torch
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and Python types, so torch.load(weights_only=True) reads them.
# Ours hold: format, model_args (GPTConfig), model, optimizer, scaler, config, iter_num, best_val_loss,
# rng, data_position, evaluated (whether iter_num's evaluation ran).
# nanoGPT's ckpt.pt holds model_args, model, optimizer, config, iter_num, best_val_loss.

CHECKPOINT_NAMES = {"best": "best.pt", "last": "last.pt"}


def save_checkpoint(obj, path):
    """Write atomically: a kill mid-write leaves the previous file at path intact."""
    import torch
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_checkpoint(path, which="best"):
    """A checkpoint file: path itself, or in directory path: best.pt / last.pt (which), else nanoGPT's ckpt.pt."""
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
    import torch
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or pickled objects we refuse to run
        raise DataError(f"cannot load checkpoint {path}: not a PyTorch checkpoint, or truncated or corrupt "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise DataError(f"{path} is not a GPT checkpoint (no 'model' / 'model_args')")
    return ckpt


def model_from_checkpoint(ckpt):
    """Build the GPT described by a checkpoint (ours or nanoGPT's) and load its weights (on CPU)."""
    from dataclasses import fields
    from model import GPT, GPTConfig
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
# Peak dense bf16 FLOP/s of common GPUs (no sparsity), for MFU. Matched against torch.cuda.get_device_name().

GPU_PEAK_FLOPS = [  # (substring of the device name, FLOP/s); longer names first so "4070 ti" beats "4070"
    ("rtx 4070 ti super", 88.2e12), ("rtx 4070 ti", 80.2e12), ("rtx 4070 super", 71.0e12), ("rtx 4070", 58.3e12),
    ("rtx 4060 ti", 44.2e12), ("rtx 4080 super", 104.4e12), ("rtx 4080", 97.5e12), ("rtx 4090", 165.2e12),
    ("rtx 3060", 25.6e12), ("rtx 3070", 40.6e12), ("rtx 3080", 59.5e12), ("rtx 3090", 71.0e12),
    ("rtx 5070 ti", 87.9e12), ("rtx 5070", 61.7e12), ("rtx 5080", 112.6e12), ("rtx 5090", 209.5e12),
    ("a100", 312e12), ("a10g", 70e12), ("l40s", 362e12), ("l4", 121e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12),
    ("gh200", 989e12), ("b200", 2250e12),
]


def peak_flops(device, override=0.0):
    """The device's dense bf16 peak FLOP/s, or None when unknown (MFU is then not reported)."""
    import torch
    if override > 0:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)
