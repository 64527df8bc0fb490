"""
The issue-13 evidence: does the 2026 recipe (Muon, the modern block, both) reach the GPT-2 recipe's loss in
fewer steps? Trains the same small model four ways through train.py itself, on the same data order and token
budget, with a small learning-rate sweep for every variant and two or more seeds at each variant's best lr.

    python data/fineweb/prepare.py /work/shared/data/english-sample.parquet --out_dir=data/sample --val_docs=400
    OMP_NUM_THREADS=1 python -m bench.recipe --data_dir=data/sample --out_dir=out/recipe

Phase 1: every variant and seed at its default lrs (multiplier 1), so an interrupted experiment still has a
complete comparison. Phase 2 (the sweep): seed 0 at the other lr multipliers (each scales all of a variant's
peak lrs). Phase 3: the other seeds at the multiplier with the lowest final val loss. Runs are train.py out_dirs under
out_dir: a finished run is skipped, a stopped one resumes from its last.pt, so the script can be killed and
rerun. Then it prints the tables (markdown), and writes results.json and curves.png into out_dir.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the model and batch all variants share: 6 layers x 256 wide at block 256; 2,048 tokens per optimizer step
COMMON = ["--n_layer=6", "--n_head=4", "--n_embd=256", "--block_size=256", "--batch_size=4",
          "--gradient_accumulation_steps=2", "--dropout=0.0", "--bias=False", "--device=cpu", "--dtype=float32",
          "--compile=False", "--condensation_seqs=0", "--eval_iters=4", "--grad_clip=1.0", "--weight_decay=0.1"]
# the modern block as config/train_fineweb_40m_modern.py ships it (Qwen3-style, tied head); SwiGLU's hidden width
# 8/3 x 256 = 683 keeps the MLP's parameter count of GELU's 4 x 256
MODERN = ["--pos_emb=rope", "--norm=rmsnorm", "--qk_norm=True", "--mlp=swiglu", "--mlp_hidden=683"]
MUON = ["--optimizer=muon"]
VARIANTS = {"baseline": [], "muon": MUON, "modern": MODERN, "both": MODERN + MUON}
# each variant's peak lrs at multiplier 1 (the sweep scales all of them together); AdamW 2e-3 is
# config/train_tiny.py's; Muon's are optim.py's defaults (modded-nanogpt / nanochat), with 2e-3 for the gains
BASE_LRS = {"learning_rate": 2e-3}
MUON_LRS = {"learning_rate": 2e-3, "muon_lr": 0.02, "adam_embed_lr": 3.6e-3, "adam_head_lr": 8e-3}


def run_args(variant, mult, seed, args):
    lrs = MUON_LRS if "--optimizer=muon" in VARIANTS[variant] else BASE_LRS
    lr_args = [f"--{k}={v * mult:g}" for k, v in lrs.items()]
    warmup = max(1, args.steps // 10)
    if lrs is MUON_LRS:  # momentum warm-up over the first fifth of the run (modded-nanogpt: 300 of ~1,500 steps)
        lr_args.append(f"--muon_momentum_warmup={max(1, args.steps // 5)}")
    return COMMON + VARIANTS[variant] + lr_args + [
        f"--min_lr={lrs['learning_rate'] * mult / 10:g}", f"--max_iters={args.steps}", f"--lr_decay_iters={args.steps}",
        f"--warmup_iters={warmup}", f"--eval_interval={args.eval_interval}", f"--log_interval={args.steps}",
        f"--seed={seed}", f"--data_dir={args.data_dir}"]


def run_dir(args, variant, mult, seed):
    return os.path.join(args.out_dir, f"{variant}-lr{mult:g}-seed{seed}")


def evals(out):
    """[(iter, val_loss)] of a run, [] if it has not started."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip().endswith("}")]
    return [(r["iter"], r["val_loss"]) for r in records if r["type"] == "eval"]


def finished(out, steps):
    return any(it == steps for it, _ in evals(out)) and os.path.exists(os.path.join(out, "last.pt"))


def run_all(jobs, args):
    """Run the (variant, mult, seed) jobs through train.py, at most args.parallel at once; skip finished ones."""
    todo = [j for j in jobs if not finished(run_dir(args, *j), args.steps)]
    running = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while todo or running:
        while todo and len(running) < args.parallel:
            job = todo.pop(0)
            out = run_dir(args, *job)
            resume = ["--init_from=resume"] if os.path.exists(os.path.join(out, "last.pt")) else []
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "train.log"), "a")
            cmd = [sys.executable, os.path.join(REPO, "train.py"), *run_args(*job, args), f"--out_dir={out}", *resume]
            running.append((job, subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
            print(f"started {os.path.basename(out)}" + (" (resumed)" if resume else ""), flush=True)
        time.sleep(1)
        for item in list(running):
            job, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see train.log)"
                print(f"{os.path.basename(run_dir(args, *job))}: {status} in {time.time() - t0:.0f} s", flush=True)


def best_mult(variant, args):
    """The sweep's multiplier with the lowest final val loss at seed 0 (a diverged run counts as inf)."""
    def final(m):
        e = evals(run_dir(args, variant, m, 0))
        return e[-1][1] if finished(run_dir(args, variant, m, 0), args.steps) and math.isfinite(e[-1][1]) else math.inf
    return min(args.lr_mults, key=lambda m: (final(m), m != 1))  # multiplier 1 until the sweep has a better one


def steps_to_reach(curve, target):
    """First step at which the val curve [(iter, loss)] reaches target, interpolated linearly between evals."""
    for (i0, l0), (i1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return i0 + (i1 - i0) * (l0 - target) / (l0 - l1) if l0 > target else i0
    return math.inf


def mean(xs):
    return sum(xs) / len(xs)


def summarize(args):
    """Tables (markdown) and results.json from the finished runs (an interrupted experiment reports what it has)."""
    done = lambda v, m, s: finished(run_dir(args, v, m, s), args.steps)
    variants = [v for v in args.variants if done(v, best_mult(v, args), 0)]
    if "baseline" not in variants:
        sys.exit("no finished baseline run yet")
    sweep = {v: {m: evals(run_dir(args, v, m, 0)) if done(v, m, 0) else [] for m in args.lr_mults} for v in variants}
    chosen = {v: best_mult(v, args) for v in variants}
    curves = {v: [evals(run_dir(args, v, chosen[v], s)) for s in range(args.seeds) if done(v, chosen[v], s)]
              for v in variants}
    mean_curves = {v: [(it, mean([dict(c)[it] for c in curves[v]])) for it, _ in curves[v][0]] for v in variants}
    target = mean_curves["baseline"][-1][1]  # the baseline's final val loss, mean over seeds
    base_steps = steps_to_reach(mean_curves["baseline"], target)  # args.steps, unless its mean curve is not monotone
    print(f"\nlr sweep (seed 0): final val loss at step {args.steps} per lr multiplier ('-': not run yet)")
    print("| variant | " + " | ".join(f"x{m:g}" for m in args.lr_mults) + " | chosen |")
    print("|---|" + "---:|" * len(args.lr_mults) + "---|")
    for v in variants:
        cells = [f"{e[-1][1]:.4f}" if e else "-" for e in sweep[v].values()]
        print(f"| {v} | " + " | ".join(cells) + f" | x{chosen[v]:g} |")
    shown = [it for it, _ in curves["baseline"][0] if it > 0][1::2]
    print(f"\nval loss at equal steps (mean over the seeds run at the chosen lr); steps for that mean curve to reach "
          f"the baseline's final val loss {target:.4f} (each seed's own curve in brackets)")
    print("| variant | seeds | " + " | ".join(f"step {it}" for it in shown) + " | steps to target | vs baseline |")
    print("|---|---:|" + "---:|" * (len(shown) + 2))
    rows = {}
    for v in variants:
        at = {it: dict(mean_curves[v])[it] for it in shown}
        reach = steps_to_reach(mean_curves[v], target)  # on the mean curve; each seed's own in brackets
        seeds = [steps_to_reach(c, target) for c in curves[v]]
        rows[v] = {"lr_mult": chosen[v], "seeds": len(curves[v]), "val_at": at, "steps_to_target": reach,
                   "steps_to_target_per_seed": seeds, "ratio": reach / base_steps}
        reach_text = (f"{reach:.1f}" if math.isfinite(reach) else "not reached") + \
            f" ({', '.join(f'{r:.1f}' if math.isfinite(r) else 'not reached' for r in seeds)})"
        print(f"| {v} | {len(curves[v])} | " + " | ".join(f"{at[it]:.4f}" for it in shown) + f" | {reach_text} | "
              f"{rows[v]['ratio']:.2f}x |")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"steps": args.steps, "target": target, "variants": rows,
                   "sweep": {v: {f"{m:g}": e for m, e in s.items()} for v, s in sweep.items()},
                   "curves": curves, "args": vars(args)}, f, indent=1)
    plot(curves, target, args)


def plot(curves, target, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (v, runs), color in zip(curves.items(), ("black", "tab:blue", "tab:orange", "tab:red")):
        for i, c in enumerate(runs):
            ax.plot([it for it, _ in c], [loss for _, loss in c], color=color, alpha=0.9 if i == 0 else 0.45,
                    label=v if i == 0 else None, marker="o", markersize=2.5, linewidth=1.2)
    ax.axhline(target, color="tab:green", linestyle="--", linewidth=0.8, label="baseline final (mean)")
    ax.set_xlabel("optimizer step (2,048 tokens each)")
    ax.set_ylabel("val loss")
    losses = [(it, loss) for runs in curves.values() for c in runs for it, loss in c]
    ax.set_ylim(min(l for _, l in losses) - 0.1, max(l for it, l in losses if it >= args.steps // 4) + 0.2)
    ax.set_title("6 x 256, block 256; each variant at its best lr, one line per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "curves.png"), dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="token files of data/fineweb/prepare.py")
    p.add_argument("--out_dir", default="out/recipe", help="one train.py out_dir per run, results.json, curves.png")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of every run (2,048 tokens each)")
    p.add_argument("--eval_interval", type=int, default=5, help="steps between val evaluations")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant at its chosen lr (weights and data order)")
    p.add_argument("--lr_mults", default="0.5,1,2", help="the sweep: multipliers of each variant's peak lrs")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which variants to run (baseline is needed)")
    p.add_argument("--parallel", type=int, default=2, help="train.py processes at once")
    p.add_argument("--report_only", action="store_true", help="do not train; tables and picture from what exists")
    args = p.parse_args()
    args.lr_mults = [float(m) for m in args.lr_mults.split(",")]
    args.variants = args.variants.split(",")
    if 1.0 not in args.lr_mults:
        sys.exit("--lr_mults must include 1 (the default lrs)")
    if "baseline" not in args.variants or any(v not in VARIANTS for v in args.variants):
        sys.exit(f"--variants: a comma-separated subset of {', '.join(VARIANTS)} that includes baseline")
    if not args.report_only:
        run_all([(v, 1.0, s) for s in range(args.seeds) for v in args.variants], args)
        run_all([(v, m, 0) for v in args.variants for m in args.lr_mults if m != 1], args)  # baseline's first
        run_all([(v, best_mult(v, args), s) for s in range(1, args.seeds) for v in args.variants], args)
    summarize(args)


if __name__ == "__main__":
    main()
