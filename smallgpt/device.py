"""
Where and in what precision models run: device and dtype selection (a device this machine cannot use is a
config error), the autocast context, host-to-device copies, and the GPUs' peak FLOP/s for MFU.
"""
from contextlib import nullcontext

import torch

from .errors import ConfigError

# -----------------------------------------------------------------------------
# Device and precision

def select_device(device="auto"):
    """The device to run on; a device name this machine cannot use is a config error, not a traceback."""
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
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast(device, dtype):
    """Mixed-precision context for the forward pass (a no-op in float32)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def to_device(t, device):
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
    if override > 0:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)
