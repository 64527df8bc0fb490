"""
The dispersion-loss paper's condensation picture for a checkpoint (needs matplotlib): the depth x cosine heatmap
as the paper draws it (per layer, the density of all cosine entries, diagonal included, over [-1, 1]), the same
densities as curves without the self-pairs, and mu(layer) with its Spearman / Kendall scores. The statistics
themselves (what mu and the scores mean) are smallgpt/condensation.py, which train.py logs at every evaluation.

    python condensation.py --out_dir=out/tiny                       # writes out/tiny/condensation.png
    python condensation.py --out_dir=out/x --which=last --num_seqs=100 --seq_len=512 --out=x.png
"""
import os
import sys
from dataclasses import dataclass

import torch

from smallgpt.checkpoint import check_which, find_checkpoint, load_checkpoint, model_from_checkpoint
from smallgpt.config import parse_args
from smallgpt.device import autocast, select_device, select_dtype
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.shards import open_split
from smallgpt.tokenizer import open_tokenizer
from smallgpt.tokens import fixed_windows, stack_windows
from smallgpt.condensation import BINS, kendall, layer_statistics, spearman

@dataclass
class PictureConfig:
    out_dir: str = "out"  # a run's directory (or a checkpoint file)
    which: str = "best"  # checkpoint in out_dir: 'best' (best.pt) | 'last' (last.pt)
    num_seqs: int = 100  # held-out sequences, evenly spaced over the val split (the paper uses ~100)
    seq_len: int = 512  # tokens per sequence (the paper: 512); capped at the model's block_size
    data_dir: str = ""  # token files to take the val split from; '' = the data_dir the checkpoint trained on
    out: str = ""  # the PNG to write; '' = <out_dir>/condensation.png
    batch_size: int = 8  # sequences per forward pass
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda' | 'mps'


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("condensation.py: error: the picture needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def densities(counts, edges):
    """Counts per layer (layers, bins) -> densities over the bins: each layer integrates to 1."""
    return counts / counts.sum(dim=1, keepdim=True) / (edges[1] - edges[0])


def draw_heatmap(ax, fig, counts, depth, edges):
    """The paper's depth x cosine heatmap: a column per layer at its relative depth, the density of all the
    cosine entries of the (averaged) matrices up the column, on a log colour scale."""
    from matplotlib.colors import LogNorm
    density = densities(counts, edges)
    step = depth[1] - depth[0] if len(depth) > 1 else 1.0
    floor = density[density > 0].min().item()
    image = ax.imshow(density.T.clamp(min=floor).numpy(), origin="lower", aspect="auto", cmap="magma",
                      norm=LogNorm(vmin=floor, vmax=density.max().item()),
                      extent=(depth[0] - step / 2, depth[-1] + step / 2, edges[0].item(), edges[-1].item()))
    ax.set(xlabel="layer / (n_layers - 1)", ylabel="cosine similarity", title="cosine density by depth (diagonal included)")
    fig.colorbar(image, ax=ax, label="density (log scale)")


def draw(pair_counts, self_counts, mu, title, path):
    """The paper's figure: the depth x cosine heatmap of whole cosine matrices; the density of the token-pair
    cosines per layer as curves, coloured by relative depth; mu against relative depth with its rank correlations."""
    plt = import_pyplot()
    from matplotlib.cm import ScalarMappable
    n = len(mu) - 1  # layers are 0..n
    depth = [layer / n for layer in range(n + 1)]  # layer / (n_layers - 1)
    cmap = plt.get_cmap("viridis")
    edges = torch.linspace(-1, 1, pair_counts.size(1) + 1)
    density = densities(pair_counts, edges)
    fig, (heat, left, right) = plt.subplots(1, 3, figsize=(19, 4.8), gridspec_kw=dict(width_ratios=[1.1, 1.4, 1]))
    draw_heatmap(heat, fig, pair_counts + self_counts, depth, edges)
    for layer in range(n + 1):
        left.stairs(density[layer].numpy(), edges.numpy(), color=cmap(depth[layer]), linewidth=1.3)
    left.set(xlim=(-1, 1), yscale="log", xlabel="cosine similarity of token pairs (i != j)",
             ylabel="density (log scale)", title="cosine distribution per layer")
    fig.colorbar(ScalarMappable(cmap=cmap), ax=left, label="layer / (n_layers - 1)")
    right.plot(depth, mu, color="0.6", zorder=1)
    right.scatter(depth, mu, c=depth, cmap=cmap, vmin=0, vmax=1, zorder=2)
    rho, tau = spearman(depth, mu), kendall(depth, mu)
    right.set(xlim=(-0.05, 1.05), ylim=(min(0.0, min(mu) - 0.05), 1.0), xlabel="layer / (n_layers - 1)",
              ylabel="mean cosine mu(layer)", title=f"Spearman {rho:+.2f}, Kendall {tau:+.2f}")
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    opt = parse_args(PictureConfig, argv)
    check_which(opt.which)
    if opt.num_seqs <= 0 or opt.seq_len < 2 or opt.batch_size <= 0:
        raise ConfigError("num_seqs and batch_size must be positive and seq_len at least 2")
    import_pyplot()  # fail before the slow part when matplotlib is missing
    path = find_checkpoint(opt.out_dir, opt.which)
    out = opt.out or os.path.join(os.path.dirname(path), "condensation.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise DataError(f"cannot write {out}: no such directory")
    if not out.lower().endswith((".png", ".pdf", ".svg")):
        raise ConfigError(f"out must name a .png, .pdf or .svg file, not {out!r}")
    ckpt = load_checkpoint(path)
    data_dir = opt.data_dir or ckpt.get("config", {}).get("data_dir")
    if not data_dir:
        raise DataError(f"{path} does not say which data it was trained on: pass --data_dir=...")
    device = select_device(opt.device)
    model = model_from_checkpoint(ckpt).to(device)
    seq_len = min(opt.seq_len, model.config.block_size)
    if seq_len < opt.seq_len:
        print(f"seq_len {opt.seq_len} > the model's block_size: using {seq_len}")
    val_tokens, _ = open_split(data_dir, "val")
    open_tokenizer(data_dir, dict(ckpt, path=path))  # the checkpoint's tokenizer must be the data's (one line)
    x, _ = stack_windows(val_tokens, fixed_windows(val_tokens, opt.num_seqs, seq_len), seq_len)
    with autocast(device, select_dtype("auto", device)):
        mu, pair_counts, self_counts = layer_statistics(model, x.to(device), opt.batch_size, bins=BINS)
    depth = list(range(len(mu)))
    iteration = ckpt.get("iter_num", "?")
    print(f"{path} (iter {iteration}): {opt.num_seqs} val sequences of {seq_len} tokens from {data_dir}")
    for layer, m in enumerate(mu):
        name = "embedding" if layer == 0 else "final (post-LN)" if layer == len(mu) - 1 else f"block {layer - 1}"
        print(f"layer {layer:2d} {name:>16}: mean cosine {m:+.4f}")
    print(f"condensation: spearman {spearman(depth, mu):+.3f} | kendall {kendall(depth, mu):+.3f}")
    draw(pair_counts, self_counts, mu, f"{path} (iter {iteration}), {opt.num_seqs} x {seq_len} val tokens", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
