"""
The condensation diagnostic of the dispersion-loss paper (arXiv 2602.00217): how similar the hidden states of
one sequence's tokens become with depth. For every layer (embedding output, each block, the final post-norm
output) we take the pairwise cosine similarities of a sequence's token vectors; mu(layer) is their mean.
The score is the rank correlation (Spearman, Kendall) of mu with depth: +1 = similarity rises with every
layer (condensed), ~0 = no trend, < 0 = dispersing. train.py logs it at every evaluation; condensation.py (the
script at the root) draws the paper's picture from these statistics.
"""
import torch

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
