"""
What the scripts at the repository root share, one job per module. The scripts (train.py, sample.py, serve.py,
eval.py, export.py, plot.py, ablate.py, condensation.py, consolidate.py) and model.py stay at the root; model.py
imports only torch, so it remains the one file to copy elsewhere. The modules sit in layers, each importing only lower ones
(tests/test_layout.py checks it):

    errors.py        the user-mistake errors and run_main: one line on stderr, never a traceback
    --
    flags.py         the one flag dialect: a dataclass of keys, config files, --key=value, --help (standard library)
    shards.py        the token data directory: manifest.json and its shards (or train.bin/val.bin), one stream a split
    sources.py       prepare.py's inputs: parquet, jsonl(.gz), txt, folders, hf: (HfFileSystem) and http(s) files
    tokens.py        training and validation windows of a token stream (numpy only)
    chat.py          the chat format: conversations checked, rendered to ids, the assistant mask, SFT rows
    metrics.py       metrics.jsonl: its writer (MetricsLog, with wandb) and its one reader
    monitor.py       what a run watches: ETA clock, loss and gradient-norm spikes, GPU memory, the compile probe
    condensation.py  the dispersion paper's condensation statistics, logged at every evaluation
    evaluation.py    bits per byte (exact token bytes) and HellaSwag scoring, shared by train.py and eval.py
    device.py        device and precision selection, autocast, GPU peak FLOP/s for MFU
    --
    config.py        every training key with its default and meaning (TrainConfig), config files, --key=value
    optim.py         the optimizer and all its parameter groups: AdamW, or Muon + AdamW (docs/muon.md)
    checkpoint.py    atomic checkpoint writing, the one checkpoint loader, the run directory's lock, the code
                     version each run records
    tokenizer.py     the tokenizer: GPT-2's or a trained BPE (tokenizer.json) as one tiktoken interface, its records
                     (a data directory's: reads shards.py)
    --
    generation.py    what sample.py and serve.py share: the model for inference, prompts, seeded samples, chat replies
    plan.py          will it fit, how long will it take: memory by category, the largest micro-batch, step times
    parallel.py      FSDP (parallel='fsdp'): sharding the model, sharded checkpoints, consolidating them to one file
"""
