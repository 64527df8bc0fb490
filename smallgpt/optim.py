"""
The optimizer of train.py, built in one place: every parameter group, its weight decay and its lr scale. The
model only names its parameters; which group each joins is decided here, from its name and shape.

- optimizer = 'adamw' (default): fused AdamW on every parameter (GPT-2's recipe) in three groups: matrices
  (weight_decay), vectors (gains and biases: no decay) and the learnable multipliers (their own decay and lr
  scale: a "no decay for 1-D" rule would silently give them 0).
- optimizer = 'muon': torch.optim.Muon on the 2-D weight matrices inside the transformer blocks (attention
  and MLP projections, Q, K and V each on its own when the model stores them apart) and fused AdamW on the
  rest: token/position embeddings, the LM head, gains, biases and the learnable multipliers. Muon
  orthogonalises each matrix's momentum with 5 Newton-Schulz iterations (in bfloat16, inside torch) and
  steps along it; embeddings and the head are not hidden-layer matrices, so every published recipe keeps
  them on Adam (KellerJordan/Muon README, modded-nanogpt, nanochat, Moonlight).

Both are driven by train.py the same way: each param group carries lr_scale, and the training loop sets
group["lr"] = get_lr(it) * lr_scale. With Muon, lr_scale is muon_lr / learning_rate (or adam_embed_lr /
learning_rate, ...), so the schedule multiplies every group alike and learning_rate stays the lr of the
gains and biases. Muon's momentum warms up linearly over its first steps (modded-nanogpt, nanochat).

Under FSDP (parallel='fsdp') every parameter is a DTensor holding this rank's rows. AdamW works on them as it
is (elementwise); Muon's Newton-Schulz must see each whole matrix, which FSDPMuon below arranges.
"""
import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # torch's own Muon arithmetic (private)

from model import MULTIPLIER_SUFFIX
from .errors import ConfigError

BLOCKS_PREFIX = "transformer.h."  # the parameters of the transformer blocks (model.py's names)


def configure_optimizer(model, cfg, device_type, dtype=None):
    """The optimizer for model (the raw module, not a compiled or DDP wrapper) as cfg asks. dtype: the
    resolved training dtype (None: not checked, for unit tests that step without autocast)."""
    if cfg.optimizer == "adamw":
        return fused_adamw(adamw_groups(model, cfg), cfg, device_type)
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optimizer=muon needs torch.optim.Muon (torch >= 2.9), not torch {torch.__version__}")
    if dtype == "float16":
        raise ConfigError("optimizer=muon does not work with dtype=float16 (its GradScaler is untested with Muon, "
                          "and Muon's Newton-Schulz runs in bfloat16): use dtype=bfloat16 or float32")
    return MuonAdamW(model, cfg, device_type)


def param_group(name, params, weight_decay, lr_scale, cfg):
    """One group as train.py drives it: the loop sets lr = get_lr(it) * lr_scale at every step."""
    return dict(params=params, name=name, weight_decay=weight_decay, lr_scale=lr_scale, lr=cfg.learning_rate * lr_scale)


def fused_adamw(groups, cfg, device_type):
    fused = device_type in ("cuda", "cpu")  # fused AdamW: one kernel for all parameters (also on a CPU)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)


def adamw_groups(model, cfg):
    """AdamW on everything: matrices (weight_decay), vectors (no decay), multipliers (their own decay and lr)."""
    kinds = {"matrices": [], "vectors": [], "multipliers": []}
    for name, p in model.named_parameters():
        kind = "multipliers" if name.endswith(MULTIPLIER_SUFFIX) else "matrices" if p.dim() >= 2 else "vectors"
        kinds[kind].append(p)
    settings = {"matrices": (cfg.weight_decay, 1.0), "vectors": (0.0, 1.0),
                "multipliers": (cfg.multiplier_weight_decay, cfg.multiplier_lr_scale)}
    return [param_group(kind, params, *settings[kind], cfg) for kind, params in kinds.items() if params]


def split_parameters(model):
    """{'muon', 'embeddings', 'head', 'vectors', 'multipliers'}: lists of (name, parameter), each parameter in
    exactly one. A tied LM head is the token embedding: named_parameters() yields it once, as an embedding."""
    groups = {"muon": [], "embeddings": [], "head": [], "vectors": [], "multipliers": []}
    for name, p in model.named_parameters():
        if name.endswith(MULTIPLIER_SUFFIX):
            kind = "multipliers"
        elif name.startswith(BLOCKS_PREFIX) and p.dim() >= 2:
            if p.dim() != 2 or min(p.shape) < 2:
                raise ConfigError(f"optimizer=muon: block parameter {name} has shape {tuple(p.shape)}, but Muon "
                                  f"takes 2-D matrices only: use optimizer=adamw with this model")
            kind = "muon"
        elif name.startswith("lm_head."):
            kind = "head"
        elif p.dim() >= 2:
            kind = "embeddings"  # wte (tied: also the head), wpe
        else:
            kind = "vectors"  # gains and biases
        groups[kind].append((name, p))
    return groups


class FSDPMuon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz sees each whole matrix when FSDP has split the parameters into row
    shards (orthogonalising a shard alone would be another, wrong update). The momentum stays sharded: its update
    is elementwise, so shards give exactly the whole tensor's values. Only the blended update is all-gathered, in
    bfloat16 (Newton-Schulz casts to bfloat16 first, so this is exact and halves the traffic); every rank
    orthogonalises it (the same bits everywhere) and keeps its own rows. On plain tensors (one process, DDP) this
    is torch.optim.Muon's step bit for bit (tests/test_muon.py), with the same state, so checkpoints move between
    the three. Cost under FSDP: one all-gather per matrix and step, and each rank runs every matrix's
    Newton-Schulz (nanochat spreads the matrices over the ranks instead; at a few ranks this is simpler)."""

    @torch.no_grad()
    def step(self, closure=None):  # closure: the Optimizer API (torch.distributed.checkpoint passes None)
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)  # torch's: the parameters with gradients, new buffers
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(update, group)
                p.mul_(1 - lr * wd)
                # p.shape is the whole matrix's, also for a DTensor shard
                p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


def orthogonalise(update, group):
    """torch's Newton-Schulz of one matrix's update; of the whole matrix when update is a DTensor shard."""
    settings = (group["ns_coefficients"], group["ns_steps"], group["eps"])
    if not isinstance(update, DTensor):
        return _zeropower_via_newtonschulz(update, *settings)
    whole = _zeropower_via_newtonschulz(update.bfloat16().full_tensor(), *settings)  # one all-gather
    # this rank's rows of it: a split of a tensor every rank holds, no communication
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


class MuonAdamW:
    """torch.optim.Muon and a fused AdamW side by side, behaving like one optimizer for train.py, bench/bench_train.py and
    GradScaler (disabled): param_groups (Muon's first), state, step, zero_grad, state_dict, load_state_dict.
    step() also sets Muon's momentum for this step of the warm-up; its step count is in the state dict."""

    def __init__(self, model, cfg, device_type):
        parts = split_parameters(model)
        lr = cfg.learning_rate
        self.muon = FSDPMuon(
            [dict(params=[p for _, p in parts["muon"]], name="muon", lr_scale=cfg.muon_lr / lr)],
            lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum_start, nesterov=True)
        # name -> (params, weight decay, lr / learning_rate); the multipliers keep today's group and settings
        adam_groups = {"embeddings": (cfg.weight_decay, cfg.adam_embed_lr / lr),
                       "head": (cfg.weight_decay, cfg.adam_head_lr / lr),
                       "vectors": (0.0, 1.0),
                       "multipliers": (cfg.multiplier_weight_decay, cfg.multiplier_lr_scale)}
        self.adamw = fused_adamw([param_group(kind, [p for _, p in parts[kind]], wd, scale, cfg)
                                  for kind, (wd, scale) in adam_groups.items() if parts[kind]], cfg, device_type)
        self.momentum = (cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup)
        self.steps = 0  # optimizer steps taken: the position in the momentum warm-up

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    @property
    def optimizers(self):
        """The torch optimizers inside (what torch.distributed.checkpoint's state-dict functions take)."""
        return (self.muon, self.adamw)

    def momentum_at(self, step):
        """Linear warm-up from muon_momentum_start to muon_momentum over muon_momentum_warmup steps."""
        start, end, warmup = self.momentum
        return end if step >= warmup else start + (end - start) * step / warmup

    @torch.no_grad()
    def step(self):
        for group in self.muon.param_groups:
            group["momentum"] = self.momentum_at(self.steps)
        self.muon.step()
        self.adamw.step()
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        self.steps = state["steps"]
