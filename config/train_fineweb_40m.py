# The popular small run: a 40M-parameter GPT on FineWeb, made for a 12 GB RTX 4070.
# 12 layers x 384 wide, 6 heads of 64 (faster than 12 heads of 32 at the same parameter count).
# 40.5M parameters: 21.2M in the blocks + 19.3M in the tied token embedding / LM head.
# Cost: 524,288 tokens per step x 6,000 steps = 3.1B tokens (about 4.5 FineWeb sample/10BT shards).
# For reference, such a run reaches val loss ~4.17 after ~3.1B FineWeb tokens.
# Micro-batch 16: `python train.py config/train_fineweb_40m.py --plan` gives 3.7 GiB of live tensors at 16 (2.7 GiB
# of activations), 4.5 GiB with its assumed allowance for the CUDA context and allocator: fits 12 GiB, up to 57 would.
# The plan is eager PyTorch's, exact on a CPU, not yet measured on a GPU (docs/training.md, "Will it fit?"). The plain
# loss would add the full 16 x 1024 x 50304 logits (~5 GiB in bf16 + float32).
out_dir = "out/fineweb-40m"
data_dir = "data/fineweb"
n_layer = 12
n_head = 6
n_embd = 384
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32  # 16 batch * 1024 tokens * 32 accum = 524,288 tokens per step
max_iters = 6000
learning_rate = 5e-4
warmup_iters = 300
lr_decay_iters = 6000
min_lr = 5e-5
eval_interval = 250
eval_iters = 50  # 50 x 16 x 1024 = 819,200 validation tokens (compare the val tokens prepare.py prints)
