# GPT-2 small (124M) on FineWeb, on a single 12 GB card.
# Cost: 524,288 tokens per step x 19,073 steps = 10B tokens (the whole FineWeb sample/10BT).
# Micro-batch 16 with no activation checkpointing: estimated, not yet measured on a GPU (BENCHMARKS.md).
# Activations measured under CPU bf16 autocast take 0.43 GiB per 1024-token sequence (6.9 GiB at 16), plus ~2 GiB
# of fp32 weights, gradients and AdamW state and ~0.6 GiB for the 1024-token cross-entropy chunks: ~9.8 GiB of 12.
# If it does not fit: --batch_size=8 --gradient_accumulation_steps=64 (same tokens per step).
out_dir = "out/fineweb-124m"
data_dir = "data/fineweb"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32  # 16 batch * 1024 tokens * 32 accum = 524,288 tokens per step
max_iters = 19073
learning_rate = 6e-4
warmup_iters = 715  # 375M tokens, as in GPT-3 small
lr_decay_iters = 19073
min_lr = 6e-5
eval_interval = 250
eval_iters = 50
