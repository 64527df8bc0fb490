# GPT-2 small (124M) on FineWeb, on a single 12 GB card.
# Cost: 524,288 tokens per step x 19,073 steps = 10B tokens (the whole FineWeb sample/10BT).
# Micro-batch 16 with no activation checkpointing: `python train.py config/train_fineweb.py --plan` gives 7.7 GiB of
# live tensors at 16 (5.5 GiB of activations, 2.3 GiB of weights, gradients and AdamW state), 9.0 GiB with its
# assumed allowance for the CUDA context and allocator: fits 12 GiB, up to 24 would. Eager PyTorch's figures, exact
# on a CPU, not yet measured on a GPU. If it does not fit: --batch_size=8 --gradient_accumulation_steps=64 (same
# tokens per step), or --batch_size=auto.
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
