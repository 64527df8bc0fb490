"""
The condensation diagnostic of the dispersion-loss paper (arXiv 2602.00217): how similar the hidden states of
one sequence's tokens become with depth. For every layer (embedding output, each block, the final post-norm
output) we take the pairwise cosine similarities of a sequence's token vectors; mu(layer) is their mean.
The score is the rank correlation (Spearman, Kendall) of mu with depth: +1 = similarity rises with every
layer (condensed), ~0 = no trend, < 0 = dispersing. train.py logs it at every evaluation.

Run as a script, it draws the paper's picture for a checkpoint (needs matplotlib): the depth x cosine heatmap
as the paper draws it (per layer, the density of all cosine entries, diagonal included, over [-1, 1]), the same
densities as curves without the self-pairs, and mu(layer) with its Spearman / Kendall scores.

    python condensation.py --out_dir=out/tiny                       # writes out/tiny/condensation.png
    python condensation.py --out_dir=out/x --which=last --num_seqs=100 --seq_len=512 --out=x.png
"""
import os
import sys
from dataclasses import dataclass

import torch

from checkpoint import CHECKPOINT_NAMES, find_checkpoint, load_checkpoint, model_from_checkpoint
from config import parse_args
from device import autocast, select_device, select_dtype
from errors import ConfigError, DataError, run_main
from tokens import fixed_windows, open_split, stack_windows

BINS = 128  # histogram bins over [-1, 1], as in the paper's figure


def layer_cosines(model, idx):
    """Cosine matrices per layer: a list over layers 0..n_layer of (B, T, T) tensors (float32, clipped to
    [-1, 1]). Layer 0 is the embedding output, layer n_layer the final post-LayerNorm output."""
    n = model.config.n_layer
    was_training = model.training
    model.eval()
    with torch.no_grad():
        final, hidden = model.hidden_states(idx, collect=range(n))
    model.train(was_training)
    states = [hidden[i] for i in range(n)] + [final]  # layer n: the last block, after the final LayerNorm
    cosines = []
    with torch.no_grad(), torch.autocast(idx.device.type, enabled=False):  # float32 cosines even under bf16 autocast
        for z in states:
            z = z.float()
            u = z / z.norm(dim=-1, keepdim=True).clamp(min=1e-3)
            cosines.append((u @ u.transpose(1, 2)).clamp(-1, 1))
    return cosines


def layer_statistics(model, idx, batch_size=8, bins=0):
    """mu(layer): the mean of all T x T cosine entries (diagonal included, as in the paper), averaged over the
    sequences idx (B, T). With bins > 0 also two (layers, bins) tensors counting cosines in `bins` equal bins
    over [-1, 1]: the token pairs i != j, and the self-pairs (the diagonal, T per sequence, all at +1 unless a
    state is ~0). pairs + self is the histogram of whole matrices, which the paper's heatmap shows; every
    sequence has T x T entries, so the pooled counts are the per-sequence histograms averaged over sequences."""
    sums, pair_counts, self_counts = None, 0, 0
    for s in range(0, idx.size(0), batch_size):  # a few sequences at a time: each layer's matrix is B x T x T
        cosines = layer_cosines(model, idx[s:s + batch_size])
        means = torch.stack([c.mean(dim=(1, 2)).sum() for c in cosines])
        sums = means if sums is None else sums + means
        if bins:
            pairs = ~torch.eye(idx.size(1), dtype=torch.bool, device=idx.device)
            pair_counts = pair_counts + torch.stack([torch.histc(c[:, pairs], bins=bins, min=-1, max=1) for c in cosines])
            self_counts = self_counts + torch.stack([torch.histc(c.diagonal(dim1=1, dim2=2), bins=bins, min=-1, max=1)
                                                     for c in cosines])
    mu = (sums / idx.size(0)).tolist()
    return (mu, pair_counts.cpu(), self_counts.cpu()) if bins else mu


def mean_cosine_per_layer(model, idx, batch_size=8):
    """mu(layer) for every layer 0..n_layer, averaged over the sequences idx (B, T)."""
    return layer_statistics(model, idx, batch_size)


def _ranks(values):
    """Ranks 1..n, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman's rank correlation: the Pearson correlation of the ranks."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var > 0 else 0.0


def kendall(x, y):
    """Kendall's tau-b (handles ties)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom > 0 else 0.0


@torch.no_grad()
def residual_rms(model, idx):
    """RMS of the residual stream at layers 0..n_layer (the embedding output, then each block's output, before
    the final norm) over the sequences idx (B, T): how large the states grow, which the papers' mechanisms act on."""
    was_training = model.training
    model.eval()
    _, hidden = model.hidden_states(idx, collect=range(model.config.n_layer + 1))
    model.train(was_training)
    return [hidden[layer].float().square().mean().sqrt().item() for layer in sorted(hidden)]


def condensation_metrics(model, idx):
    """The diagnostic for held-out sequences idx (B, T), as flat metrics: cond/spearman, cond/kendall and
    cond/mean_cos_l{layer} for every layer, and resid/rms_l{layer}, the residual stream's RMS."""
    mu = mean_cosine_per_layer(model, idx)
    depth = list(range(len(mu)))
    metrics = {"cond/spearman": spearman(depth, mu), "cond/kendall": kendall(depth, mu)}
    metrics.update({f"cond/mean_cos_l{layer}": m for layer, m in enumerate(mu)})
    metrics.update({f"resid/rms_l{layer}": r for layer, r in enumerate(residual_rms(model, idx))})
    return metrics


# -----------------------------------------------------------------------------
# The picture: python condensation.py --out_dir=...

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
    if opt.which not in CHECKPOINT_NAMES:
        raise ConfigError(f"which must be one of {', '.join(CHECKPOINT_NAMES)}, not {opt.which!r}")
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
