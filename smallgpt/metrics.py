"""
A run's metrics.jsonl: its one writer (MetricsLog, train.py's, with wandb beside it when asked) and its one
reader, which train.py (trimming the file on resume), plot.py and comparison tools share. One JSON object per
line:

    {"type": "train", "iter": 199, "loss": 4.81, "lr": 0.0002, "grad_norm": 0.64, "ms": 609.7, "tok_s": 1680,
     "tokens": 204800, ...}         # optional: mfu, dispersion, mult/..., time_s (wall seconds since the start)
    {"type": "eval", "iter": 200, "val_loss": 5.11, "val_bpb": 2.74, ...}   # optional: cond/..., time_s
    {"type": "health", "iter": 57, "what": "loss", ...}                     # a loss or gradient-norm spike

A train record's `tokens` counts every token trained on after the step `iter` (so iterations start at 0 and
tokens at (iter + 1) x tokens per step). A line cut by a kill mid-write (or still being written while a run is
going) can only be the last one; it is skipped. Any other damaged line (a stray byte, a hand edit) is an error
naming it for plot.py and ablate.py; train.py leaves it out with a warning, so that it never blocks a resume.
This module imports nothing heavy (no torch, no matplotlib).
"""
import json
import os
import sys
from dataclasses import asdict

from .errors import DataError


def metrics_path(run):
    """A run's metrics.jsonl: `run` is its out_dir or the file itself."""
    return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run


def read_records(run, skip_damaged=False):
    """Every complete record of a run's metrics.jsonl, in file order. A last line cut mid-write is skipped. A
    damaged line anywhere else (not UTF-8, not JSON, not a record) is a DataError naming it (the file is damaged,
    not just still being written), or with skip_damaged left out with one warning on stderr: train.py's resume
    and end-of-run summary take that road, since a damaged log line must not stop a run whose checkpoint is fine."""
    path = metrics_path(run)
    try:
        with open(path, "rb") as f:  # bytes: one bad byte spoils its line, not the whole file
            lines = f.readlines()
    except FileNotFoundError:
        raise DataError(f"no metrics.jsonl in {run}" if path != run else f"no such file: {run}")
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        problem = None
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except ValueError:
            if number == len(lines):  # the writer was killed (or is still writing) mid-line
                break
            problem = "is not a JSON record"
        else:
            if not isinstance(record, dict) or "type" not in record or "iter" not in record:
                problem = "is not a metrics record (no type / iter)"
        if problem is None:
            records.append(record)
        elif not skip_damaged:
            raise DataError(f"{path} line {number} {problem}: {line[:60]!r}")
        else:
            damaged.append(f"line {number} {problem}")
    if damaged:
        print(f"warning: {path}: {len(damaged)} damaged line(s) left out ({'; '.join(damaged[:3])})", file=sys.stderr)
    return records


def of_type(records, kind):
    return [r for r in records if r["type"] == kind]


def wall_time(records):
    """Seconds the run has taken: the last `time_s` when train.py recorded it; otherwise an estimate from the
    train records' step times (ms x steps between records; evaluations not counted). Returns (seconds, exact)."""
    timed = [r["time_s"] for r in records if "time_s" in r]
    if timed:
        return max(timed), True
    total, previous = 0.0, -1
    for r in sorted(of_type(records, "train"), key=lambda r: r["iter"]):
        total += r["ms"] / 1000 * (r["iter"] - previous)  # ms is the mean step time since the previous record
        previous = r["iter"]
    return total, False


def summarize(records, at=()):
    """One run in numbers: tokens seen, best and last val loss / bpb (with their iterations), the val loss at
    the iterations `at`, wall time. Missing values are None."""
    train, evals = of_type(records, "train"), of_type(records, "eval")
    best = min(evals, key=lambda r: r["val_loss"], default=None)
    last = max(evals, key=lambda r: r["iter"], default=None)
    val_at = {r["iter"]: r["val_loss"] for r in evals}
    seconds, exact = wall_time(records)
    return {
        "iters": max((r["iter"] + 1 for r in train), default=0),
        "tokens": max((r["tokens"] for r in train), default=0),
        "best_val_loss": best["val_loss"] if best else None, "best_iter": best["iter"] if best else None,
        "best_val_bpb": min((r["val_bpb"] for r in evals), default=None),
        "last_val_loss": last["val_loss"] if last else None, "last_val_bpb": last["val_bpb"] if last else None,
        "last_iter": last["iter"] if last else None,
        "val_loss_at": {it: val_at.get(it) for it in at},
        "wall_s": seconds, "wall_exact": exact,
    }


def shared_eval_iters(runs_records):
    """The evaluation iterations present in every run, sorted."""
    sets = [{r["iter"] for r in of_type(records, "eval")} for records in runs_records]
    return sorted(set.intersection(*sets)) if sets else []


class MetricsLog:
    """metrics.jsonl in out_dir (always) and wandb (when asked). On resume, records after the checkpoint's
    iteration are dropped, so the file shows one consistent curve; the trimmed file replaces the old one
    atomically, so a kill at that moment loses nothing."""

    def __init__(self, cfg, resume_iter):
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        kept = []
        if resume_iter is not None and os.path.exists(self.path):
            records = read_records(self.path, skip_damaged=True)  # a line cut by a kill or a damaged one is left out
            kept = [r for r in records  # evaluations of the resumed checkpoint itself stay (eval.py's too)
                    if r["iter"] < resume_iter or r["type"] in ("eval", "eval_downstream") and r["iter"] == resume_iter]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(self.path + ".tmp", self.path)
        self.wandb = None
        if cfg.wandb_log:
            try:
                import wandb  # optional, and slow to import: only when asked for
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg),
                                        settings=wandb.Settings(init_timeout=60))
            except Exception as e:  # no wandb, no network, no login: train anyway
                print(f"wandb disabled: {type(e).__name__}: {e}")

    def write(self, record):
        with open(self.path, "a") as f:  # one line per record, closed at once: a reader sees whole lines
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items() if k not in ("type", "iter")},
                           step=record["iter"])
