"""
Watching a training run (train.py uses these): elapsed time and ETA, loss and gradient-norm spikes, the GPU's
memory at start-up, and a torch.compile that cannot build its kernels. torch is imported inside the functions
that need it: plot.py imports the formatting helpers only.
"""
import math
import statistics
import time
from collections import deque

ETA_WARMUP_STEPS = 5  # steps after each start not used for the ETA: compilation, allocator and cache warm-up
SPIKE_WINDOW = 100  # a spike is judged against the median of this many previous steps (spikes left out)
SPIKE_MIN_HISTORY = 10  # ... and only once this many steps are known
MAX_SKIPS_IN_A_ROW = 10  # spike_action='skip': more updates in a row dropped stop the run (skipping is not curing it)
GPU_BUSY_FRACTION = 0.15  # warn when more than this fraction of the GPU's memory is in use before we allocate


def duration(seconds):
    """12.3s, 4m05s, 2h07m: short and fixed in style, for log lines and tables."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


def count(n):
    """3.07K, 204.80M, 10.00B: token counts at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def file_size(nbytes):
    """1.52 GB, 85.3 MB, 12 KB: file and disk sizes, in decimal units as df -H and file managers show them."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= 0.9995 * size:  # 999,999 bytes is 1.00 MB, not 1e+03 KB
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} bytes"


# -----------------------------------------------------------------------------
# Time: elapsed and ETA

class Clock:
    """The run's wall time (carried over a resume through `elapsed`) and an ETA to max_iters from the measured
    time per step since the first ETA_WARMUP_STEPS steps of this start (evaluations and checkpoints included,
    so the ETA covers them too)."""

    def __init__(self, iter_num, max_iters, elapsed=0.0):
        self.start = time.time() - elapsed
        self.first_iter, self.max_iters, self.mark = iter_num, max_iters, None

    def elapsed(self):
        return time.time() - self.start

    def eta(self, iter_num):
        """Seconds left after iter_num steps, or None while warming up. Call once per step."""
        if self.mark is None:
            if iter_num - self.first_iter >= ETA_WARMUP_STEPS:
                self.mark = (time.time(), iter_num)
            return None
        mark_time, mark_iter = self.mark
        if iter_num <= mark_iter:
            return None
        return (time.time() - mark_time) / (iter_num - mark_iter) * max(0, self.max_iters - iter_num)


# -----------------------------------------------------------------------------
# Health: spikes

class SpikeWatch:
    """A value above factor x the median of the last SPIKE_WINDOW values that were not spikes is a spike (judged once
    SPIKE_MIN_HISTORY values are known): spikes stay out of the history, so a stretch of them is judged against the
    level before it, not against a median it drags up. check() records a value and returns that median when a
    spike starts, once; `streak` counts the spike values in a row (0: no spike in progress)."""

    def __init__(self, factor):
        self.factor, self.history, self.streak = factor, deque(maxlen=SPIKE_WINDOW), 0

    def median(self):
        return statistics.median(self.history) if len(self.history) >= SPIKE_MIN_HISTORY else None

    def is_spike(self, value):
        median = self.median()
        return self.factor > 0 and median is not None and value > self.factor * median

    def check(self, value):
        median, spike = self.median(), self.is_spike(value)
        started = spike and not self.streak
        self.streak = self.streak + 1 if spike else 0
        if not spike:
            self.history.append(value)
        return median if started else None


class Health:
    """Spike watches on the train loss and the gradient norm. check() records a step and returns one metrics record
    per spike that starts (type 'health'); skip() says before a step's update whether spike_action='skip' drops it,
    diverged() after it whether spike_action='rollback' goes back to the last good state. The watches' state goes
    into every checkpoint, so a resumed run judges each step as the uninterrupted run did."""

    def __init__(self, loss_factor, grad_factor):
        self.watches = {"loss": SpikeWatch(loss_factor), "grad_norm": SpikeWatch(grad_factor)}
        self.skips_in_a_row = 0

    def check(self, it, **values):
        records = []
        for what, value in values.items():
            watch = self.watches[what]
            # an infinite gradient norm is float16's grad scaler skipping a step by design, not a spike
            median = watch.check(value) if math.isfinite(value) else None
            if median is not None:
                records.append({"type": "health", "iter": it, "what": what, "value": value, "median": median,
                                "factor": watch.factor})
        return records

    def skip(self, it, loss, grad_norm, scaler_enabled):
        """The 'skip' record of a step whose update spike_action='skip' drops (its loss or gradient norm is a spike
        or not finite), or None. An infinite gradient norm under float16's grad scaler is left to the scaler: it
        skips that update itself and lowers its scale."""
        for what, value in (("loss", loss), ("grad_norm", grad_norm)):
            watch = self.watches[what]
            if math.isfinite(value):
                drop = watch.is_spike(value)
            else:  # NaN or inf: the update would spoil the weights, unless float16's scaler skips it itself
                drop = not (what == "grad_norm" and scaler_enabled)
            if drop:
                self.skips_in_a_row += 1
                return {"type": "health", "iter": it, "what": "skip", "cause": what, "value": value,
                        "median": watch.median(), "factor": watch.factor}
        self.skips_in_a_row = 0
        return None

    def diverged(self, loss, patience):
        """spike_action='rollback': the loss is not finite, or has just been a spike for `patience` steps in a row
        (once per stretch: a stretch that cannot be rolled back is not reported again at every step)."""
        return not math.isfinite(loss) or self.watches["loss"].streak == patience

    def in_loss_spike(self):
        return self.watches["loss"].streak > 0

    def state(self):
        return {"skips_in_a_row": self.skips_in_a_row,
                **{what: {"history": list(w.history), "streak": w.streak} for what, w in self.watches.items()}}

    def load(self, state):
        """A checkpoint's state (None, from a checkpoint older than it: the watches start afresh)."""
        state = state or {}
        self.skips_in_a_row = state.get("skips_in_a_row", 0)
        for what, watch in self.watches.items():
            saved = state.get(what, {"history": [], "streak": 0})
            watch.history.clear()
            watch.history.extend(saved["history"])
            watch.streak = saved["streak"]

    @staticmethod
    def message(r):
        if r["what"] == "skip":
            return (f"skipped the update of iter {r['iter']} (spike_action=skip): {r['cause']} {r['value']:.4g}"
                    + (f" > {r['factor']:g} x the median {r['median']:.4g} of the last steps" if math.isfinite(r["value"])
                       else " is not finite"))
        if r["what"] == "rollback":
            return (f"rolled back at iter {r['iter']} to {r['checkpoint']} of iter {r['to_iter']} (spike_action=rollback): "
                    f"the loss {r['value']:.4g} " + ("is not finite" if not math.isfinite(r["value"]) else
                                                     f"stayed above {r['factor']:g} x its median for {r['steps']} steps")
                    + f"; training windows {r['windows'][0]:,} to {r['windows'][1] - 1:,} skipped")
        return (f"warning: {r['what']} spike at iter {r['iter']}: {r['value']:.4g} > {r['factor']:g} x the median "
                f"{r['median']:.4g} of the last steps")


# -----------------------------------------------------------------------------
# Start-up checks: the GPU's memory, torch.compile

def gpu_report(device):
    """Lines about a CUDA device: its name and memory, and a warning when other processes already hold a good
    part of it (an out-of-memory later would otherwise be a mystery)."""
    import torch
    free, total = torch.cuda.mem_get_info(device)  # whole-device numbers, other processes included
    gib = 2 ** 30
    lines = [f"GPU {torch.cuda.get_device_name(device)}: {total / gib:.1f} GiB, {free / gib:.1f} GiB free"]
    if total - free > GPU_BUSY_FRACTION * total:
        lines.append(f"warning: {(total - free) / gib:.1f} GiB of the GPU's {total / gib:.1f} GiB are in use by "
                     f"other processes (see nvidia-smi): this run may run out of memory")
    return lines


def compile_failure(error):
    """One line for an exception raised while torch.compile built its kernels: the innermost cause and a fix."""
    cause = error
    while getattr(cause, "inner_exception", None) or cause.__cause__:
        cause = getattr(cause, "inner_exception", None) or cause.__cause__
    text = (str(cause).strip().splitlines() or [""])[0][:200]
    if "Python.h" in text:
        fix = "install the Python headers (Debian/Ubuntu: sudo apt install python3-dev)"
    elif any(word in text for word in ("compiler", "gcc", "g++", "CC", "cc1")):
        fix = "install a C/C++ compiler (Debian/Ubuntu: sudo apt install build-essential)"
    else:
        fix = "run with TORCHDYNAMO_VERBOSE=1 for the details"
    return f"torch.compile cannot build its kernels ({type(cause).__name__}: {text}); fix: {fix}, or set compile=False"


def probe_compiled(model, batch_size, block_size, device, ctx):
    """Run one forward pass of the compiled model on a training-shaped batch, so that a compiler that cannot
    build kernels fails here and not in the middle of the loop. The RNG state is restored (dispersion subsets,
    dropout): the run stays exactly the same as without the probe. Returns None or the exception."""
    import torch
    x = torch.zeros((batch_size, block_size), dtype=torch.long, device=device)
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []), ctx:
            model(x, x)  # the training step's graph: train mode, grad enabled, the same shapes (reused by step 1)
    except torch.OutOfMemoryError:
        raise  # a real problem of the run, not of the compiler
    except Exception as e:  # the compiler's errors come in many types (InvalidCxxCompiler, CalledProcessError, ...)
        return e
    return None
