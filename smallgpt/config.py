"""
The configuration of train.py: every key, its one default and its meaning, in TrainConfig below (the model's
keys are inherited from GPTConfig in model.py). Config files are Python files of assignments, as in nanoGPT;
they are run as code (exec), so run only config files you trust:

    python train.py config/train_fineweb_40m.py --batch_size=8 --compile=False

Files are applied in order, then --key=value overrides. An unknown key or a value of the wrong type stops
the run at start-up with one line naming the key. `python train.py --help` lists every key.
"""
import math
from dataclasses import asdict, dataclass, fields, replace

from model import GPTConfig
from .errors import ConfigError
from .flags import describe, parse_args  # noqa: F401 (the one flag dialect, used by every script)


@dataclass
class TrainConfig(GPTConfig):
    # keys that also take the string 'auto' (resolved at start by smallgpt/plan.py) -> the key that keeps their
    # product: batch_size='auto' keeps the tokens per step of the micro-batch it replaced (smallgpt/flags.py)
    AUTO_KEYS = {"batch_size": "gradient_accumulation_steps"}
    vocab_size: int = 0  # model vocabulary; 0 = the data's tokenizer padded up to a multiple of 64 (GPT-2: 50257 -> 50304)
    # --- input / output
    out_dir: str = "out"  # checkpoints (last.pt, best.pt), metrics.jsonl and config.json go here
    data_dir: str = "data/fineweb"  # token data written by data/fineweb/prepare.py (manifest.json and its shards)
    dataset: str = ""  # nanoGPT compatibility: when set, data_dir becomes data/<dataset>
    init_from: str = "scratch"  # 'scratch' | 'resume' (from out_dir/last.pt) | a checkpoint path | 'gpt2'...'gpt2-xl'
    sft: bool = False  # fine-tune on conversations (data_dir from data/chat/prepare.py): loss on the assistant's tokens only
    # --- evaluation, logging, checkpoints
    eval_interval: int = 250  # iterations between evaluations (and checkpoints); the last iteration is always one
    eval_iters: int = 50  # validation micro-batches per evaluation, always the same held-out windows
    eval_only: bool = False  # evaluate the init_from model once, print, exit (writes nothing)
    log_interval: int = 10  # iterations between console / metrics lines
    loss_spike_factor: float = 1.5  # warn (console, metrics.jsonl) when a step's loss is above this x its recent median; 0 = off
    grad_spike_factor: float = 5.0  # the same for the gradient norm (its median over the last 100 steps); 0 = off
    spike_action: str = "rollback"  # 'warn' | 'skip' (drop a spike step's update) | 'rollback' (to the last checkpoint): docs/monitoring.md
    rollback_patience: int = 5  # spike_action='rollback': loss-spike steps in a row (or one non-finite loss) that trigger it
    always_save_checkpoint: bool = True  # write last.pt at every evaluation (best.pt only when val loss improves)
    hellaswag_interval: int = 0  # iterations between HellaSwag scorings (a multiple of eval_interval); 0 = off
    hellaswag_items: int = 1000  # HellaSwag items scored in training (the first n of the 10,042; std-err ~1.4% at 1000)
    hellaswag_file: str = ""  # local HellaSwag validation jsonl; '' = downloaded once into ~/.cache/gpt-eval
    condensation_seqs: int = 32  # held-out sequences for the condensation diagnostic at each eval; 0 = off
    wandb_log: bool = False  # also log to Weights & Biases (pip install wandb; honours WANDB_MODE=offline)
    wandb_project: str = "gpt"  # wandb project name
    wandb_run_name: str = "run"  # wandb run name
    # --- batch
    batch_size: int = 12  # micro-batch in sequences of block_size tokens, or 'auto': the largest that fits (docs/training.md)
    gradient_accumulation_steps: int = 40  # micro-batches per optimizer step, over all GPUs together
    seed: int = 1337  # seeds the weights, the data order and every random draw
    # --- optimizer (AdamW)
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 600000  # optimizer steps in the run
    weight_decay: float = 0.1  # decoupled weight decay on matrices (never on vectors, gains, biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm (multipliers excluded) to this; 0 = off
    multiplier_weight_decay: float = 2e-3  # weight decay of learnable multipliers (paper: required, 2e-3)
    multiplier_lr_scale: float = 1.0  # learnable multipliers' lr = this x the scheduled lr
    # --- optimizer (Muon): defaults from modded-nanogpt's Muon records and nanochat (docs/muon.md)
    optimizer: str = "adamw"  # 'adamw' (every parameter) | 'muon' (Muon on the blocks' matrices, AdamW on the rest)
    muon_lr: float = 0.02  # Muon peak lr, scaled by sqrt(max(1, rows/cols)) (modded-nanogpt, nanochat, Keller Jordan)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum after the warm-up (every published recipe)
    muon_momentum_start: float = 0.85  # momentum at step 0, raised linearly (modded-nanogpt 0.85 -> 0.95)
    muon_momentum_warmup: int = 300  # steps of that momentum warm-up (modded-nanogpt today: 300)
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay, x the scheduled lr (modded: 0 best)
    adam_embed_lr: float = 3.6e-3  # optimizer=muon: AdamW peak lr of the embeddings, tied head included (modded #7)
    adam_head_lr: float = 8e-3  # optimizer=muon: AdamW peak lr of an untied LM head (modded-nanogpt, nanochat d12)
    # --- learning-rate schedule
    decay_lr: bool = True  # False: constant learning_rate after warm-up
    lr_schedule: str = "cosine"  # 'cosine': warm-up, cosine to min_lr | 'wsd': warm-up, constant, linear decay
    warmup_iters: int = 2000  # linear warm-up steps
    lr_decay_iters: int = 600000  # step at which the lr reaches min_lr (usually max_iters)
    min_lr: float = 6e-5  # final learning rate (about learning_rate / 10)
    wsd_decay_frac: float = 0.2  # 'wsd': the last fraction of lr_decay_iters spent decaying
    # --- system
    device: str = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
    dtype: str = "auto"  # 'auto' (bfloat16 on GPUs that have it, float16 on older ones, float32 on CPU) | explicit
    compile: bool = True  # torch.compile the model (minutes of compile time, then much faster on GPUs)
    compile_fallback: bool = True  # compile fails (no C compiler / Python headers): True = warn, train uncompiled; False = stop
    backend: str = "auto"  # process-group backend under torchrun: 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
    parallel: str = "ddp"  # under torchrun: 'ddp' (each GPU holds the whole model) | 'fsdp' (each holds 1/N of weights, gradients, optimizer state)
    fsdp_sync_every_micro_batch: bool = False  # parallel=fsdp: reduce-scatter gradients after every micro-batch (no whole gradient copy between them; more traffic)
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = look up the GPU's dense bf16 peak
    deterministic: bool = False  # CPU only: one thread, deterministic kernels: repeat runs bit-identical under any load
    # --- the planner (smallgpt/plan.py)
    plan: bool = False  # print the memory and time plan of this config and exit: no data, no GPU memory used
    gpu_memory_gb: float = 0.0  # the memory budget of --plan and batch_size='auto', GiB; 0 = the detected GPU's, else 12

    def __post_init__(self):
        """GPTConfig's checks of the model keys; vocab_size 0 (the data's, resolved by with_vocab_size) passes them."""
        GPTConfig(**{**model_args(self), "vocab_size": self.vocab_size or 1})


CHOICES = {
    "lr_schedule": ("cosine", "wsd"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "backend": ("auto", "nccl", "gloo"),
    "optimizer": ("adamw", "muon"),
    "parallel": ("ddp", "fsdp"),
    "spike_action": ("warn", "skip", "rollback"),
}
POSITIVE = ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval", "hellaswag_items",
            "learning_rate", "adam_eps", "multiplier_lr_scale", "muon_lr", "adam_embed_lr", "adam_head_lr", "rollback_patience")
NON_NEGATIVE = ("max_iters", "warmup_iters", "lr_decay_iters", "condensation_seqs", "hellaswag_interval", "seed",
                "min_lr", "weight_decay", "multiplier_weight_decay", "grad_clip", "peak_flops", "loss_spike_factor",
                "grad_spike_factor", "muon_weight_decay", "muon_momentum_warmup", "gpu_memory_gb")
FRACTIONS = {"dropout": (0.0, 1.0), "beta1": (0.0, 1.0), "beta2": (0.0, 1.0), "muon_momentum": (0.0, 1.0),
             "muon_momentum_start": (0.0, 1.0)}  # each in [low, high)


def validate(config):
    """Checks of TrainConfig values beyond their types."""
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {getattr(config, key)!r}")
    for f in fields(config):
        if f.type is float and not math.isfinite(getattr(config, f.name)):
            raise ConfigError(f"{f.name} must be a finite number, not {getattr(config, f.name)}")
    for key in POSITIVE:
        if getattr(config, key) != "auto" and getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive, not {getattr(config, key)}")
    for key in NON_NEGATIVE:
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} must not be negative, not {getattr(config, key)}")
    for key, (low, high) in FRACTIONS.items():
        if not low <= getattr(config, key) < high:
            raise ConfigError(f"{key} must be in [{low:g}, {high:g}), not {getattr(config, key)}")
    if not 0.0 <= config.wsd_decay_frac <= 1.0:
        raise ConfigError(f"wsd_decay_frac must be in [0, 1], not {config.wsd_decay_frac}")
    for key in ("loss_spike_factor", "grad_spike_factor"):
        if 0 < getattr(config, key) <= 1:
            raise ConfigError(f"{key} must be above 1 (a multiple of the recent median) or 0 (off), not {getattr(config, key)}")
    if config.spike_action == "rollback" and not config.loss_spike_factor:
        raise ConfigError("spike_action='rollback' watches the loss: it needs loss_spike_factor > 0")
    if config.hellaswag_interval % config.eval_interval:
        raise ConfigError(f"hellaswag_interval ({config.hellaswag_interval}) must be a multiple of eval_interval "
                          f"({config.eval_interval}): HellaSwag runs with an evaluation")
    if config.batch_size == "auto" and config.parallel == "fsdp":
        raise ConfigError("batch_size='auto' tries a whole model on one GPU, not FSDP's shards: set batch_size with "
                          "parallel=fsdp (--plan shows what each card needs)")
    if config.seed >= 2 ** 63:
        raise ConfigError(f"seed must be below 2**63, not {config.seed}")
    if config.dataset:
        config.data_dir = f"data/{config.dataset}"
    return config


def load_train_config(argv):
    return validate(parse_args(TrainConfig, argv))


def with_vocab_size(config, data_vocab):
    """config for data of data_vocab token ids: vocab_size 0 (the default) becomes data_vocab padded up to a multiple
    of 64 (fast matmuls; the padded ids are never targets); an explicit vocab_size must hold the data's ids."""
    if config.vocab_size == 0:
        return replace(config, vocab_size=-(-data_vocab // 64) * 64)
    if config.vocab_size < data_vocab:
        raise ConfigError(f"vocab_size {config.vocab_size} is smaller than the data's vocabulary ({data_vocab}); "
                          f"0 = the data's, padded")
    return config


def model_args(config):
    """The GPTConfig part of a config, as a plain dict."""
    names = {f.name for f in fields(GPTConfig)}
    return {k: v for k, v in asdict(config).items() if k in names}
