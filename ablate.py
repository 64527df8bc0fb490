"""
A multi-seed ablation: train a base config with each overlay and each seed, one run after the other, then
compare. Runs already complete are skipped and a half-finished one is resumed, so an interrupted sweep goes on
where it stopped when the same command runs again (train.py's own exact resume does the work).

    python ablate.py --base=config/train_fineweb_40m.py --seeds=1,2,3 \
        --variants=baseline,config/ablate_dispersion.py,config/ablate_multipliers.py
    python ablate.py --base=config/train_tiny.py --data_dir=data/sample --seeds=1,2 --report_only --markdown

Each run goes to <out_dir>/<variant>-s<seed> (the variant's name: its overlay's file name without .py). The
report: per variant, the mean and spread (sample standard deviation over seeds) of the final val loss, val bpb,
condensation score (Spearman) and mean cosine of the late half of the layers, and the paired difference to the baseline seed by seed (same seed = same data order
and the same initial weights where the architecture is the same).
"""
import ctypes
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass

from smallgpt.config import parse_args
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.metrics import of_type, read_records

REPO = os.path.dirname(os.path.abspath(__file__))
PR_SET_PDEATHSIG = 1  # prctl option from <linux/prctl.h>: a signal for this process when its parent dies


@dataclass
class AblateConfig:
    base: str = ""  # the base config file every run starts from
    variants: str = "baseline"  # comma-separated: 'baseline' (the base alone) or overlay config files
    seeds: str = "1,2,3"  # comma-separated seeds; every variant runs with each
    out_dir: str = "out/ablation"  # runs go to <out_dir>/<variant>-s<seed>
    data_dir: str = ""  # passed to every run when set
    train_args: str = ""  # more --key=value overrides for every run, space-separated (e.g. '--max_iters=500')
    report_only: bool = False  # compare the runs that exist, train nothing
    markdown: bool = False  # print the comparison as a markdown table


def variant_name(variant):
    return "baseline" if variant == "baseline" else os.path.splitext(os.path.basename(variant))[0]


def parse_sweep(cfg):
    """The (variant, overlay) pairs and seeds of a sweep, checked before any run starts."""
    if not cfg.base or not os.path.isfile(cfg.base):
        raise ConfigError(f"base must name a config file, not {cfg.base!r}")
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    for v in variants:
        if v != "baseline" and not os.path.isfile(v):
            raise ConfigError(f"variants: no config file {v!r} (use 'baseline' for the base alone)")
    names = [variant_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variants: two of them have the same name ({', '.join(names)})")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"seeds must be comma-separated integers, not {cfg.seeds!r}")
    if not seeds or not variants:
        raise ConfigError("give at least one variant and one seed")
    return list(zip(names, variants)), seeds


def run_one(cfg, name, overlay, seed):
    """Train (or resume, or find finished) one run through train.py's own entry point."""
    out = os.path.join(cfg.out_dir, f"{name}-s{seed}")
    resume = any(os.path.exists(os.path.join(out, n)) for n in ("last.pt", "best.pt"))
    command = [sys.executable, os.path.join(REPO, "train.py"), cfg.base, *([overlay] if overlay != "baseline" else []),
               *cfg.train_args.split(), f"--seed={seed}", f"--out_dir={out}",
               *([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else []), *(["--init_from=resume"] if resume else [])]
    print(f"=== {name}, seed {seed}: {'resuming' if resume else 'training'} -> {out}", flush=True)
    if subprocess.run(command, preexec_fn=end_with_parent(os.getpid())).returncode != 0:
        raise DataError(f"the run {out} failed (see above); run the same command again to resume the sweep")


def end_with_parent(parent):
    """A preexec_fn that ties a train.py child to this process (Linux): the kernel sends the child SIGTERM when
    ablate.py dies, kill -9 included, so a killed sweep leaves no trainer running (on SIGTERM train.py saves
    last.pt and exits; the sweep's rerun resumes it). None elsewhere: there a killed sweep's child runs on, and
    train.py's out_dir lock keeps the rerun from training beside it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child runs only the call

    def tie():
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before the call: nobody would signal us, so do not start
            os._exit(1)
    return tie


def late_mean_cosine(record):
    """The mean cosine mu of the late half of the diagnostic layers (blocks n/2.. and the final output), where
    condensation shows and where a Spearman score of a few layers saturates at +1; None without the diagnostic."""
    layers = sorted(int(k.rsplit("_l", 1)[1]) for k in record if k.startswith("cond/mean_cos_l"))
    if not layers:
        return None
    late = [layer for layer in layers if layer > layers[-1] // 2]
    return statistics.fmean(record[f"cond/mean_cos_l{layer}"] for layer in late)


def final_scores(out):
    """The last evaluation of one run: val loss, val bpb, condensation scores (None where missing)."""
    evals = of_type(read_records(out), "eval")
    if not evals:
        return None
    last = max(evals, key=lambda r: r["iter"])
    return {"iter": last["iter"], "val_loss": last["val_loss"], "val_bpb": last["val_bpb"],
            "spearman": last.get("cond/spearman"), "late_mu": late_mean_cosine(last)}


def mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f}"


def report(cfg, variants, seeds):
    """One row per variant: mean ± spread over seeds, and the paired difference to the first variant. Only runs
    that reached the sweep's last evaluated iteration count (a half-finished one would compare unequal steps)."""
    scores = {}
    for name, _ in variants:
        for seed in seeds:
            out = os.path.join(cfg.out_dir, f"{name}-s{seed}")
            scores[name, seed] = final_scores(out) if os.path.isfile(os.path.join(out, "metrics.jsonl")) else None
    finished = max((d["iter"] for d in scores.values() if d is not None), default=None)
    scores = {k: d if d is not None and d["iter"] == finished else None for k, d in scores.items()}  # whole runs only
    reference = variants[0][0]
    header = ["variant", "runs", "val loss", "val bpb", "condensation", "late mu", f"val loss - {reference}, per seed"]
    rows = []
    for name, _ in variants:
        done = [scores[name, s] for s in seeds if scores[name, s] is not None]
        paired = [(s, scores[name, s]["val_loss"] - scores[reference, s]["val_loss"]) for s in seeds
                  if scores[name, s] is not None and scores[reference, s] is not None]
        rows.append([name, f"{len(done)}/{len(seeds)}", mean_spread([d["val_loss"] for d in done]),
                     mean_spread([d["val_bpb"] for d in done]), mean_spread([d["spearman"] for d in done]),
                     mean_spread([d["late_mu"] for d in done]),
                     ("" if name == reference else mean_spread([d for _, d in paired]) + " (" +
                      ", ".join(f"s{s} {d:+.4f}" for s, d in paired) + ")")])
    if cfg.markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    print("\n".join(lines))
    print("mean ± sample standard deviation over seeds; the final evaluation of each run. condensation: Spearman of "
          "mu with depth; late mu: mu over the late half of the layers. A difference inside the spread is no effect.")


def main(argv):
    cfg = parse_args(AblateConfig, argv)
    variants, seeds = parse_sweep(cfg)
    if not cfg.report_only:
        for seed in seeds:  # seed by seed: a sweep stopped half-way still has complete pairs to compare
            for name, overlay in variants:
                run_one(cfg, name, overlay, seed)
    report(cfg, variants, seeds)


if __name__ == "__main__":
    run_main(main)
