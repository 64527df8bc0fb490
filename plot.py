"""
Pictures and a table of one or several training runs from their metrics.jsonl: no wandb needed, and a run that
is still going works too (what is there is read; a line being written is skipped).

    python plot.py out/tiny                                # writes out/tiny/plot.png, prints the table
    python plot.py out/base out/disp out/mult --smooth=0.9  # three runs overlaid (an ablation): ./plot.png
    python plot.py out/a out/b --logx --out=ab.png
    python plot.py out/a out/b --table --markdown          # only the table, as markdown for a results file

Runs are named first, without --; then --key=value options (`python plot.py --help` lists them).

Panels, each drawn only when some run has its data: train and val loss (with the updates that spike_action skipped
and the stretches it rolled back), val bits per byte, learning rate,
gradient norm, throughput, MFU, the dispersion term, the condensation scores, multiplier statistics, HellaSwag,
and per run the mean cosine of each layer over training. The x axis counts tokens trained on. The picture needs
matplotlib (pip install matplotlib); the table does not.
"""
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from smallgpt.config import parse_args
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.metrics import is_number, metrics_path, of_type, read_records, shared_eval_iters, summarize
from smallgpt.monitor import duration

TRAIN, EVAL, DOWNSTREAM = ("train",), ("eval",), ("eval", "eval_downstream")  # eval.py appends eval_downstream
LAYER_STATS = ("qk_ratio", "attn_out_rms", "mlp_out_rms")  # model.multiplier_stats: mult/h{layer}.{stat}
NORM_KINDS = ("qkv", "attn_out", "fc", "mlp_out")  # model.weight_norms: norm/h{layer}.{kind}, at every evaluation
PANELS = [  # title, y label, y scale, [(legend label, record types, key)]
    ("loss", "cross-entropy (nats)", "linear", [("train", TRAIN, "loss"), ("val", EVAL, "val_loss")]),
    ("val bits per byte", "bits per UTF-8 byte", "linear", [("val", EVAL, "val_bpb")]),
    ("learning rate", "lr", "linear", [("lr", TRAIN, "lr")]),
    ("gradient norm (before clipping)", "global L2 norm", "log", [("norm", TRAIN, "grad_norm")]),
    ("throughput", "tokens / s", "linear", [("tok/s", TRAIN, "tok_s")]),
    ("model FLOPs utilisation", "fraction of peak", "linear", [("mfu", TRAIN, "mfu")]),
    ("dispersion term", "loss term", "linear", [("dispersion", TRAIN, "dispersion")]),
    ("condensation: mean cosine vs depth", "rank correlation", "linear",
     [("spearman", EVAL, "cond/spearman"), ("kendall", EVAL, "cond/kendall")]),
    ("multipliers (all)", "value", "linear",
     [("min", TRAIN, "mult/min"), ("rms", TRAIN, "mult/rms"), ("max", TRAIN, "mult/max")]),
    ("multipliers (mean over layers)", "value", "linear",
     [(stat, TRAIN, f"mult/layer_mean.{stat}") for stat in LAYER_STATS]),
    ("weight norms (raw W, mean over layers)", "Frobenius norm", "linear",
     [(kind, EVAL, f"norm/layer_mean.{kind}") for kind in NORM_KINDS]),
    ("residual stream RMS", "RMS", "log", [("embedding", EVAL, "resid/rms_l0"), ("last block", EVAL, "resid/rms_last")]),
]
YLIMITS = {  # panels of bounded quantities: on a fixed axis a flat 1.00 reads as what it is, not as noise near 1
    "condensation: mean cosine vs depth": (-1.05, 1.05),  # rank correlations lie in [-1, 1]
}
SMOOTHED = ("loss", "grad_norm", "tok_s", "mfu", "dispersion")  # noisy per-step series; --smooth leaves the rest
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")  # evaluation series of one panel: where they coincide, the hollow later marks show


def marker_style(marker):
    return dict(marker=marker, markersize=3) if marker == MARKERS[0] else dict(marker=marker, markersize=5,
                                                                               markerfacecolor="none")


# -----------------------------------------------------------------------------
# A run: its records and where each one sits on the tokens axis

def add_layer_means(record, prefix, stats):
    """prefix/layer_mean.{stat}: the mean over layers of the record's prefix/h{layer}.{stat} values, if any."""
    for stat in stats:
        values = [v for k, v in record.items() if k.startswith(f"{prefix}/h") and k.endswith(f".{stat}") and is_number(v)]
        if values:
            record[f"{prefix}/layer_mean.{stat}"] = sum(values) / len(values)


class Run:
    def __init__(self, path):
        self.name = os.path.normpath(path)
        self.records = read_records(path)  # each with a type and a whole-number iter; any other value may be missing
        for r in of_type(self.records, "train"):  # per-layer statistics, averaged over layers for one curve each
            add_layer_means(r, "mult", LAYER_STATS)
        for r in of_type(self.records, "eval"):
            add_layer_means(r, "norm", NORM_KINDS)
            layers = layer_numbers(r, "resid/rms_l")
            if layers:  # the output of the last block, before the final norm
                r["resid/rms_last"] = r[f"resid/rms_l{max(layers)}"]
        # steps done -> tokens trained on, from the train records (exact even if the batch size changed on resume)
        train = sorted((r for r in of_type(self.records, "train") if is_number(r.get("tokens"))), key=lambda r: r["iter"])
        self.steps = np.array([0] + [r["iter"] + 1 for r in train], dtype=float)
        self.tokens = np.array([0] + [r["tokens"] for r in train], dtype=float)
        self.tokens_per_step = self.tokens[-1] / self.steps[-1] if train else config_tokens_per_step(path)

    def x(self, records, axis):
        """Where records sit on the x axis: steps done (a train record's loss includes its own step) or tokens."""
        steps = np.array([r["iter"] + (r["type"] == "train") for r in records], dtype=float)
        if axis == "steps":
            return steps
        beyond = self.tokens[-1] + (steps - self.steps[-1]) * self.tokens_per_step  # evaluations after the last log
        return np.where(steps > self.steps[-1], beyond, np.interp(steps, self.steps, self.tokens))

    def series(self, kinds, key, axis):
        records = sorted((r for r in self.records if r["type"] in kinds and is_number(r.get(key))),
                         key=lambda r: r["iter"])
        return self.x(records, axis), np.array([r[key] for r in records], dtype=float)


def config_tokens_per_step(path):
    """Tokens per step from the run's config.json (a run that has not logged a train record yet), or None."""
    try:
        with open(os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")) as f:
            cfg = json.load(f)
        return cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def layer_numbers(record, prefix):
    """The layer numbers of the per-layer keys prefix0, prefix1, ... of a record (or of any set of keys)."""
    return sorted(int(k[len(prefix):]) for k in record if k.startswith(prefix) and k[len(prefix):].isdigit())


def smooth(y, alpha):
    """Exponential moving average, bias-corrected like TensorBoard's (the first points are not pulled to 0)."""
    out, m = np.empty_like(y), 0.0
    for t, v in enumerate(y):
        m = alpha * m + (1 - alpha) * v
        out[t] = m / (1 - alpha ** (t + 1))
    return out


# -----------------------------------------------------------------------------
# The picture

def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DataError("the picture needs matplotlib: pip install matplotlib (or print only the table: --table)")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def panels_with_data(runs, axis):
    """PANELS plus one HellaSwag panel (its accuracies, under any key naming them), keeping those some run has
    data for."""
    keys = sorted({k for run in runs for r in run.records if r["type"] in DOWNSTREAM for k in r
                   if "hellaswag" in k and "acc" in k and is_number(r[k])})
    extra = [("HellaSwag", "accuracy", "linear", [(k.split("/")[-1], DOWNSTREAM, k) for k in keys])] if keys else []
    return [p for p in PANELS + extra if any(len(run.series(kinds, key, axis)[0]) for run in runs for _, kinds, key in p[3])]


def health_events(run, axis):
    """Where a run skipped updates and what it rolled back (spike_action), on the x axis: the x of each skipped
    step, and (from, to) of each rollback, from its checkpoint to the step that triggered it."""
    health = of_type(run.records, "health")
    skips = [r for r in health if r["what"] == "skip"]
    rollbacks = [r for r in health if r["what"] == "rollback" and "to_iter" in r]
    skip_x = run.x([{"type": "train", "iter": r["iter"]} for r in skips], axis)
    starts = run.x([{"type": "eval", "iter": r["to_iter"]} for r in rollbacks], axis)  # the checkpoint's step
    ends = run.x([{"type": "train", "iter": r["iter"]} for r in rollbacks], axis)
    return list(skip_x), list(zip(starts, ends))


def draw_health(ax, runs, axis, colors):
    """On the loss panel: a dotted line at each skipped update, a shaded span over each stretch rolled back."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = []
    for i, run in enumerate(runs):
        skips, rollbacks = health_events(run, axis)
        color = colors[i % len(colors)]
        for x in skips:
            ax.axvline(x, color=color, linestyle=":", linewidth=1)
        for start, end in rollbacks:
            ax.axvspan(start, end, color=color, alpha=0.15)
        if skips and not any(h.get_label() == "skipped update" for h in handles):
            handles.append(Line2D([], [], color="0.3", linestyle=":", label="skipped update"))
        if rollbacks and not any(h.get_label() == "rolled back" for h in handles):
            handles.append(Patch(color="0.3", alpha=0.15, label="rolled back"))
    return handles


def draw_panel(ax, runs, panel, axis, alpha, colors):
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    title, ylabel, yscale, lines = panel
    extra = draw_health(ax, runs, axis, colors) if title == "loss" else []
    for i, run in enumerate(runs):
        for (label, kinds, key), linestyle, marker in zip(lines, LINESTYLES, MARKERS):
            x, y = run.series(kinds, key, axis)
            style = dict(color=colors[i % len(colors)], linestyle=linestyle)
            if kinds != TRAIN:
                style.update(marker_style(marker))
            if key in SMOOTHED and alpha > 0 and len(y) > 1:
                ax.plot(x, y, alpha=0.25, linewidth=0.8, **style)  # the raw curve, faint behind the smoothed one
                y = smooth(y, alpha)
            ax.plot(x, y, linewidth=1.4, **style)
    if len(lines) > 1:  # which line style is which series (the colours are the runs)
        handles = [Line2D([], [], color="0.3", linestyle=ls, label=label, **(marker_style(m) if kinds != TRAIN else {}))
                   for (label, kinds, _), ls, m in zip(lines, LINESTYLES, MARKERS)]
        ax.legend(handles=handles + extra, fontsize=8)
    ax.set(title=title, ylabel=ylabel, yscale=yscale)
    if title in YLIMITS:
        ax.set_ylim(*YLIMITS[title])
    if yscale == "log":  # labels at 1, 2, 5 x 10^k as plain numbers (0.5, not 5 x 10^-1)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.ticklabel_format(axis="y", useOffset=False)  # 1.0002, not +1 and 0.0002


def draw_layer_cosines(ax, run, axis, plt):
    """The mean token-pair cosine of every layer over training: one run, one line per layer."""
    layers = layer_numbers({k for r in run.records for k in r}, "cond/mean_cos_l")
    cmap = plt.get_cmap("viridis")
    for layer in layers:
        x, y = run.series(EVAL, f"cond/mean_cos_l{layer}", axis)
        ax.plot(x, y, color=cmap(layer / max(1, layers[-1])), marker="o", markersize=2, linewidth=1.2,
                label="embedding" if layer == 0 else "final (post-LN)" if layer == layers[-1] else f"block {layer - 1}")
    ax.legend(fontsize=7, ncol=2)
    ax.set(title=f"mean cosine per layer: {run.name}", ylabel="mean cosine")


def draw(runs, path, alpha=0.0, logx=False):
    plt = import_pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter
    axis = "tokens" if all(run.tokens_per_step for run in runs) else "steps"
    panels = panels_with_data(runs, axis)
    cosine_runs = [run for run in runs if any("cond/mean_cos_l0" in r for r in run.records)]
    count = len(panels) + len(cosine_runs)
    if count == 0:
        raise DataError("nothing to plot yet: no train or eval records")
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.5 * rows + 0.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, panel in zip(axes.flat, panels):
        draw_panel(ax, runs, panel, axis, alpha, colors)
    for ax, run in zip(axes.flat[len(panels):], cosine_runs):
        draw_layer_cosines(ax, run, axis, plt)
    for ax in axes.flat[:count]:
        ax.grid(alpha=0.3)
        ax.set_xlabel("tokens" if axis == "tokens" else "steps")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 2.5M, 1G: readable token counts
        if logx:
            ax.set_xscale("log")  # points at 0 tokens (the first evaluation) drop out
    for ax in axes.flat[count:]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=2, label=run.name) for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 4), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the runs' legend on top
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The table

def spread(values, count):
    """At most `count` of values, evenly spaced, the last always included."""
    if len(values) <= count:
        return list(values)
    return [values[i] for i in sorted({round(j * (len(values) - 1) / (count - 1)) for j in range(count)})]


def table_rows(runs, columns=4):
    """Header and one row of strings per run; the val loss columns are iterations every run has evaluated."""
    at = spread([it for it in shared_eval_iters([run.records for run in runs]) if it > 0], columns)
    num = lambda v: "-" if v is None else f"{v:.4f}"
    header = ["run", "steps", "tokens", "best val loss (iter)", "last val loss (iter)", "best bpb", "last bpb",
              *[f"val loss @{it}" for it in at], "wall time"]
    rows = []
    for run in runs:
        s = summarize(run.records, at)
        rows.append([run.name, str(s["iters"]), f"{s['tokens']:,}",
                     "-" if s["best_iter"] is None else f"{s['best_val_loss']:.4f} ({s['best_iter']})",
                     "-" if s["last_iter"] is None else f"{s['last_val_loss']:.4f} ({s['last_iter']})",
                     num(s["best_val_bpb"]), num(s["last_val_bpb"]), *[num(s["val_loss_at"][it]) for it in at],
                     ("" if s["wall_exact"] else "~") + duration(s["wall_s"])])
    return header, rows


def format_table(header, rows, markdown=False):
    if markdown:
        lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    align = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([align(header), *map(align, rows)])


# -----------------------------------------------------------------------------

USAGE = """
usage: python plot.py RUN [RUN ...] [--key=value ...]
  RUN: a run's out_dir (or its metrics.jsonl); several are overlaid. The runs come first, without --.
"""


@dataclass
class PlotConfig:
    runs: list = field(default_factory=list)  # the RUN arguments, in order
    out: str = ""  # the picture to write (.png, .pdf, .svg); '' = <RUN>/plot.png for one run, plot.png here for several
    smooth: float = 0.0  # EMA weight in [0, 1) for the noisy train curves (0.9 = strong); the raw curve stays faint
    logx: bool = False  # logarithmic tokens axis
    table: bool = False  # print the table only, write no picture
    markdown: bool = False  # print the table as markdown


def options(argv):
    """The command line, checked: run directories first, then --key=value options (one dialect with the other
    scripts: a typo gets a suggestion, a value needs its =)."""
    opt = parse_args(PlotConfig, argv, positional="runs", usage=USAGE)
    if not opt.runs:
        raise ConfigError("name at least one run: python plot.py RUN [RUN ...] [--key=value ...] (--help lists the keys)")
    if not 0.0 <= opt.smooth < 1.0:
        raise ConfigError(f"smooth must be in [0, 1), not {opt.smooth}")
    if not opt.out:
        opt.out = os.path.join(os.path.dirname(metrics_path(opt.runs[0])), "plot.png") if len(opt.runs) == 1 else "plot.png"
    if not opt.table and not opt.out.lower().endswith((".png", ".pdf", ".svg")):
        raise ConfigError(f"out must name a .png, .pdf or .svg file, not {opt.out!r}")
    return opt


def main(argv):
    opt = options(argv)
    runs = [Run(path) for path in opt.runs]
    print(format_table(*table_rows(runs), markdown=opt.markdown))
    if not opt.table:
        draw(runs, opt.out, opt.smooth, opt.logx)
        print(f"wrote {opt.out}")


if __name__ == "__main__":
    run_main(main)
