"""
Evaluate a model after training: val loss and bits per byte over EVERY window of a prepared val split, and
HellaSwag (completion style, acc and acc_norm) on the 10,042 validation items.

    python eval.py --model=out/fineweb-40m --data_dir=data/fineweb       # a run (best.pt), both evaluations
    python eval.py --model=out/fineweb-40m/hf --hellaswag_items=0 --data_dir=data/fineweb   # an export, val only
    python eval.py --model=gpt2 --hellaswag=hellaswag_val.jsonl          # HF GPT-2 124M, a local HellaSwag copy

--model is a run directory, a checkpoint file, a directory written by export.py (or any transformers causal
LM using the GPT-2 tokenizer), or a Hugging Face name such as gpt2. Text is encoded, and bits per byte counted,
with the model's own tokenizer (the checkpoint's, or an export's tokenizer.json), which must be the data_dir's.
The HellaSwag file is downloaded once into
--cache_dir unless --hellaswag=PATH is given; when that download fails, the val rows are computed and
printed first and the run then ends with one line saying how to score HellaSwag or skip it. --val_windows=N
caps the val pass at N evenly spaced windows. Results are printed as a table and, for a checkpoint, appended
to its run's metrics.jsonl as records of type "eval_downstream". See docs/export-eval.md.
"""
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from smallgpt.checkpoint import check_which, find_checkpoint, load_checkpoint, model_from_checkpoint
from smallgpt.config import parse_args
from smallgpt.device import autocast, select_device
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.evaluation import HELLASWAG_ITEMS, bits_per_byte, loss_sums, read_hellaswag, score_hellaswag, token_bytes
from smallgpt.shards import open_split
from smallgpt.tokenizer import (GPT2, TOKENIZER_FILE, check_same, checkpoint_tokenizer, data_tokenizer,
                                get_tokenizer, read_tokenizer)
from smallgpt.tokens import stack_windows


@dataclass
class EvalConfig:
    model: str = "out"  # a run directory, a checkpoint, an export.py directory or a Hugging Face name (gpt2)
    which: str = "best"  # 'best' | 'last': the checkpoint to read from a run directory (falls back to the other)
    data_dir: str = ""  # prepared tokens (prepare.py): val loss and bits per byte on its val windows; '' = skip
    val_windows: int = 0  # windows of block_size scored, evenly spaced over the val split; 0 = every window
    hellaswag: str = ""  # a local HellaSwag validation jsonl; '' = the cached copy, downloaded the first time
    hellaswag_items: int = HELLASWAG_ITEMS  # items scored (the first n of the file); 0 = skip HellaSwag
    cache_dir: str = ""  # where the downloaded HellaSwag file is kept; '' = ~/.cache/gpt-eval
    batch_size: int = 8  # val windows, or HellaSwag items (4 rows each), per forward pass
    device: str = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
    dtype: str = "float32"  # 'float32' (numbers that do not depend on the GPU) | 'bfloat16' | 'float16'
    log_metrics: bool = True  # append the results to the run's metrics.jsonl (checkpoints only)
    lm_eval: str = ""  # lm-evaluation-harness tasks on a transformers model, comma-separated: names or .yaml files
    lm_eval_limit: int = 0  # items per lm-eval task (the first n); 0 = all


def validate(cfg):
    check_which(cfg.which)
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, not {cfg.dtype!r}")
    if cfg.batch_size < 1 or min(cfg.hellaswag_items, cfg.val_windows, cfg.lm_eval_limit) < 0:
        raise ConfigError("batch_size must be at least 1; hellaswag_items, val_windows and lm_eval_limit must not be "
                          "negative")
    if not cfg.data_dir and cfg.hellaswag_items == 0 and not cfg.lm_eval:
        raise ConfigError("nothing to evaluate: give a data_dir, hellaswag_items > 0 or lm_eval tasks")
    if cfg.lm_eval and is_checkpoint(cfg.model):
        raise ConfigError(f"lm_eval runs on a transformers model and {cfg.model} is a checkpoint: export it first "
                          f"(python export.py --model={cfg.model}) and pass --model=<the export>")
    return cfg


# -----------------------------------------------------------------------------
# The model: ours (a checkpoint) or a transformers one, as a function from ids (B, T) to logits (B, T, V)

@dataclass
class Loaded:
    logits_fn: object  # ids (B, T) -> logits (B, T, V)
    block_size: int  # longest sequence the model takes
    vocab_size: int  # logits per position
    name: str  # what was loaded, for the table
    tokenizer: dict  # the record of the tokenizer it reads and writes (smallgpt/tokenizer.py)
    run_dir: str = ""  # the checkpoint's directory (its metrics.jsonl); '' for transformers models
    iter_num: int = 0
    hf: object = None  # the transformers model (lm-eval is handed this one, never loads another)


def is_checkpoint(path):
    return os.path.isfile(path) or any(os.path.isfile(os.path.join(path, n)) for n in ("best.pt", "last.pt", "ckpt.pt"))


def load_model(name, which, device):
    if is_checkpoint(name):
        path = find_checkpoint(name, which)
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt).merge_multipliers().to(device).eval()
        return Loaded(lambda idx: model(idx)[0], model.config.block_size, model.config.vocab_size,
                      f"{path} (iter {ckpt.get('iter_num', '?')})", checkpoint_tokenizer(ckpt),
                      os.path.dirname(os.path.abspath(path)), int(ckpt.get("iter_num", 0)))
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        hf = transformers.AutoModelForCausalLM.from_pretrained(name).float().to(device).eval()
    except ImportError:
        raise DataError(f"{name} is not a checkpoint; loading it as a transformers model needs pip install transformers")
    except (OSError, ValueError) as e:  # no such directory or Hub name, no network
        where = "a directory without a checkpoint or a transformers model" if os.path.exists(name) else "no such path"
        raise DataError(f"cannot load {name}: {where}; as a Hugging Face name: {(str(e).splitlines() or [''])[0]}")
    hc = hf.config
    block = getattr(hc, "n_positions", None) or hc.max_position_embeddings
    return Loaded(lambda idx: hf(idx).logits, block, hc.vocab_size, name, transformers_tokenizer(name), hf=hf)


def transformers_tokenizer(name):
    """The tokenizer of a transformers model: export.py writes a trained one's tokenizer.json byte for byte; any
    other model (gpt2, an export of a GPT-2-tokenizer run) is taken to use GPT-2's."""
    path = os.path.join(name, TOKENIZER_FILE)
    try:
        return read_tokenizer(path) if os.path.isfile(path) else GPT2
    except DataError:  # a tokenizer.json that is not a BPE of ours (GPT-2's, as export.py writes it)
        return GPT2


# -----------------------------------------------------------------------------
# Evaluations

def val_batches(n_tokens, T, batch_size, cap=0):
    """[(window starts, length)] covering every target of a split of n_tokens once: consecutive windows of T
    tokens, the last one shorter. cap > 0: that many full windows, evenly spaced (the tail left out)."""
    starts = list(range(0, n_tokens - 1, T))
    full = [s for s in starts if s + T < n_tokens]
    capped = 0 < cap < len(starts)
    if capped:
        full = [full[i] for i in np.linspace(0, len(full) - 1, min(cap, len(full))).round().astype(int)]
    batches = [(full[b:b + batch_size], T) for b in range(0, len(full), batch_size)]
    if len(full) < len(starts) and not capped:  # the tail: fewer than T targets left
        batches.append(([starts[-1]], n_tokens - 1 - starts[-1]))
    return batches, len(starts)


@torch.no_grad()
def val_metrics(loaded, data_dir, batch_size, device, ctx, cap=0):
    """Loss and bits per byte over every target of the val split (or cap windows of it): consecutive windows of
    block_size tokens, each predicted from the start of its window."""
    tokens, meta = open_split(data_dir, "val")
    check_same(data_tokenizer(data_dir, meta), loaded.tokenizer, f"data_dir {data_dir}", loaded.name)
    if meta["eot_token"] >= loaded.vocab_size:  # HF GPT-2 has no rows for the reserved chat ids: checked per batch
        raise DataError(f"{data_dir} has vocab_size {meta['vocab_size']}, more than the model's {loaded.vocab_size}")
    data_ids = min(meta["vocab_size"], loaded.vocab_size)  # the ids a batch may hold
    table = token_bytes(get_tokenizer(loaded.tokenizer), loaded.vocab_size)  # each token's bytes, as it reads them
    batches, n_windows = val_batches(len(tokens), loaded.block_size, batch_size, cap)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch, length in tqdm(batches, desc="val", unit="batch"):
        x, y = (t.to(device) for t in stack_windows(tokens, batch, length, data_ids))
        with ctx:
            logits = loaded.logits_fn(x)
        sums += loss_sums(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none"), y, table)
    nats, count, byte_nats, n_bytes = sums.tolist()
    return {"val_loss": nats / count, "val_bpb": bits_per_byte(byte_nats, n_bytes), "val_tokens": int(count),
            "val_windows": sum(len(b) for b, _ in batches), "val_windows_total": n_windows}


def hellaswag_metrics(loaded, items, batch_size, device, ctx):
    with ctx:
        return score_hellaswag(loaded.logits_fn, items, get_tokenizer(loaded.tokenizer).encode_ordinary,
                               loaded.block_size, device, batch_size, progress=True)


# -----------------------------------------------------------------------------
# lm-evaluation-harness: its own tasks and metrics, through its Python API on the model loaded above

def lm_eval_tasks(spec):
    """(task manager, tasks) for --lm_eval: registered names (the harness's tasks, which fetch their data from the
    Hugging Face Hub) and .yaml files (local tasks). Checked before the model is loaded: an unknown name is one
    line."""
    import difflib
    os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # else datasets pings a server to count a local read
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError('lm_eval needs lm-evaluation-harness: pip install "lm_eval[hf]"')
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    files = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    for file in files:
        if not os.path.isfile(file):
            raise DataError(f"no lm-eval task file {file}")
    names = [t for t in tasks if t not in files]
    manager = TaskManager(include_defaults=bool(names))  # indexing the built-in tasks takes ~20 s: only if needed
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            raise ConfigError(f"unknown lm-eval task {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                              + ": a task name of lm-evaluation-harness or a task .yaml file")
    return manager, tasks


def lm_eval_metrics(loaded, model_name, manager, tasks, batch_size, limit):
    """{task: {metric: value}} from lm-evaluation-harness, with the harness's metric names (a filter other than
    'none' is kept: 'exact_match,strict-match'); '<metric>_stderr' beside each and 'items'."""
    import transformers
    import lm_eval
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:  # plain lm_eval lacks accelerate, which its transformers wrapper imports
        raise DataError('lm_eval needs its transformers extra: pip install "lm_eval[hf]"')
    logging.getLogger("lm_eval.models.huggingface").addFilter(  # what handing it a loaded model always logs
        lambda record: not record.getMessage().startswith(("`pretrained` model kwarg", "Passed an already-initialized")))
    lm = HFLM(pretrained=loaded.hf, tokenizer=transformers.AutoTokenizer.from_pretrained(model_name),
              batch_size=batch_size)  # the loaded model: no second copy
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit or None,
                                      bootstrap_iters=1000)  # bootstrapped stderrs (perplexity): 1,000 resamples
    except ConnectionError as e:  # a registered task's dataset is on the Hub
        raise DataError(f"lm-eval cannot fetch a task's data from the Hugging Face Hub ({str(e).splitlines()[0]}): "
                        f"run it once online, or give a local task .yaml")
    results = {}
    for task, values in out["results"].items():
        metrics = {k.removesuffix(",none"): v for k, v in values.items() if isinstance(v, (int, float)) and "," in k}
        results[task] = {**metrics, "items": out["n-samples"].get(task, {}).get("effective")}  # a group has none
    return results


# -----------------------------------------------------------------------------
# Output

def table_rows(results):
    """(task, metric, value, on) rows: val and HellaSwag as train.py names them, lm-eval tasks as it does."""
    rows = []
    if "val" in results:
        r = results["val"]
        part = (f" ({r['val_windows']:,} of {r['val_windows_total']:,} windows)"
                if r["val_windows"] < r["val_windows_total"] else "")
        rows += [("val", "loss", r["val_loss"], f"{r['val_tokens']:,} tokens{part}"), ("val", "bpb", r["val_bpb"], "")]
    if "hellaswag" in results:
        r = results["hellaswag"]
        rows += [("hellaswag", "acc", r["hellaswag_acc"], f"{r['hellaswag_items']:,} items"),
                 ("hellaswag", "acc_norm", r["hellaswag_acc_norm"], "")]
    for task, metrics in results.get("lm_eval", {}).items():
        names = [m for m in metrics if m != "items" and "_stderr" not in m]
        for i, metric in enumerate(names):
            stderr = metrics.get(metric.replace(",", "_stderr,") if "," in metric else f"{metric}_stderr")
            on = (f"{metrics['items']:,} items, " if i == 0 and metrics["items"] else "") + (
                f"± {stderr:.4f}" if isinstance(stderr, float) else "")
            rows.append((task, metric, metrics[metric], on.rstrip(", ")))
    return rows


def print_table(name, results):
    rows = table_rows(results)
    # columns as wide as 'hellaswag' and 'acc_norm' at least: the same layout with or without lm-eval's longer names
    w_task, w_metric = (max([len(r[i]) for r in rows] + [least]) for i, least in ((0, 9), (1, 8)))
    print(f"\n{name}\n| {'task':<{w_task}} | {'metric':<{w_metric}} |  value | on |")
    print(f"|{'-' * (w_task + 2)}|{'-' * (w_metric + 2)}|--------|----|")
    for task, metric, value, on in rows:
        print(f"| {task:<{w_task}} | {metric:<{w_metric}} | {value:.4f} | {on} |")


def log_results(loaded, results):
    """Append one eval_downstream record per evaluation to the run's metrics.jsonl."""
    path = os.path.join(loaded.run_dir, "metrics.jsonl")
    try:
        with open(path, "a") as f:
            for task, r in results.items():
                f.write(json.dumps({"type": "eval_downstream", "iter": loaded.iter_num, "task": task,
                                    "model": loaded.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **r}) + "\n")
    except OSError as e:  # a full disk raises without a file name: name it
        raise DataError(f"cannot append the results to {path}: {e.strerror}")
    print(f"appended to {path}")


def read_hellaswag_or_defer(cfg):
    """(file, items) of HellaSwag, or (None, the error) when its download failed and there is something else to
    evaluate first: eval.py then reports what it computed and ends with this error. A file the user passed,
    missing or damaged, fails now, before the model is loaded."""
    try:
        return read_hellaswag(cfg.hellaswag, cfg.cache_dir, cfg.hellaswag_items,
                              remedy="pass a local copy with --hellaswag=PATH, or --hellaswag_items=0 to skip it"), None
    except DataError as e:
        if cfg.hellaswag or not (cfg.data_dir or cfg.lm_eval):
            raise
        return None, DataError(f"HellaSwag was not scored: {e}")


def main(argv):
    cfg = validate(parse_args(EvalConfig, argv))
    device = select_device(cfg.device)
    ctx = autocast(device, cfg.dtype)
    lm_eval = lm_eval_tasks(cfg.lm_eval) if cfg.lm_eval else None  # an unknown task fails before anything runs
    hellaswag, not_scored = read_hellaswag_or_defer(cfg) if cfg.hellaswag_items else (None, None)
    loaded = load_model(cfg.model, cfg.which, device)
    results = {}
    if cfg.data_dir:
        results["val"] = val_metrics(loaded, cfg.data_dir, cfg.batch_size, device, ctx, cfg.val_windows)
    if hellaswag:
        path, items = hellaswag
        results["hellaswag"] = {**hellaswag_metrics(loaded, items, cfg.batch_size, device, ctx), "hellaswag_file": path}
    if lm_eval:
        results["lm_eval"] = lm_eval_metrics(loaded, cfg.model, *lm_eval, cfg.batch_size, cfg.lm_eval_limit)
    print_table(loaded.name, results)
    if cfg.log_metrics and loaded.run_dir:
        log_results(loaded, results)
    if not_scored:  # computed and shown what could be; now what could not
        raise not_scored


if __name__ == "__main__":
    run_main(main)
