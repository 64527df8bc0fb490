"""
The condensation diagnostic of the dispersion-loss paper (arXiv 2602.00217): how similar the hidden states of
one sequence's tokens become with depth. For every layer (embedding output, each block, the final post-norm
output) we take the pairwise cosine similarities of a sequence's token vectors; mu(layer) is their mean.
The score is the rank correlation (Spearman, Kendall) of mu with depth: +1 = similarity rises with every
layer (condensed), ~0 = no trend, < 0 = dispersing. train.py logs it at every evaluation.
"""
import torch


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
    for z in states:
        z = z.float()
        u = z / z.norm(dim=-1, keepdim=True).clamp(min=1e-3)
        cosines.append((u @ u.transpose(1, 2)).clamp(-1, 1))
    return cosines


def mean_cosine_per_layer(model, idx, batch_size=8):
    """mu(layer): the mean of all T x T cosine entries (diagonal included), averaged over the sequences."""
    totals = None
    for s in range(0, idx.size(0), batch_size):
        means = torch.stack([c.mean(dim=(1, 2)).sum() for c in layer_cosines(model, idx[s:s + batch_size])])
        totals = means if totals is None else totals + means
    return (totals / idx.size(0)).tolist()


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


def condensation_metrics(model, idx):
    """The diagnostic for held-out sequences idx (B, T), as flat metrics: cond/spearman, cond/kendall and
    cond/mean_cos_l{layer} for every layer."""
    mu = mean_cosine_per_layer(model, idx)
    depth = list(range(len(mu)))
    metrics = {"cond/spearman": spearman(depth, mu), "cond/kendall": kendall(depth, mu)}
    metrics.update({f"cond/mean_cos_l{layer}": m for layer, m in enumerate(mu)})
    return metrics
