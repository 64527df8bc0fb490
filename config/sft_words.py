# Fine-tune a tiny base model to follow two instructions it has never seen, "repeat: w1 w2 w3" and "reverse: ...",
# on a CPU in about two minutes: the learning check of docs/chat.md (its numbers and commands). The base is a
# 2 x 64 model pretrained on English (config/train_tiny.py with the overrides docs/chat.md gives); SFT takes its
# architecture and weights (init_from), and trains only on the assistant's tokens.
# Data: python data/chat/prepare.py --words=2000 --out_dir=data/chat_words (2,000 train + 200 held-out
# conversations of 2-4 words from 23; no held-out prompt occurs in train).
sft = True
init_from = "out/tiny-base/last.pt"
data_dir = "data/chat_words"
out_dir = "out/sft-words"
batch_size = 16  # 16 conversations (rows of block_size 32 tokens) per step
gradient_accumulation_steps = 1
max_iters = 500  # 4 epochs of the 2,000 conversations
eval_interval = 100
eval_iters = 4  # 4 x 16 = 64 held-out conversations
log_interval = 50
condensation_seqs = 0
compile = False
# Muon: in our CPU trials (models trained from scratch on this data) AdamW got no held-out reply exact (lr 3e-3,
# 300 steps; lr 1e-2, 500 steps), Muon with these settings all 200 in 500 steps
optimizer = "muon"
muon_lr = 0.02
adam_embed_lr = 1e-2
learning_rate = 1e-2  # the gains' lr and the schedule's peak
warmup_iters = 20
lr_decay_iters = 500
min_lr = 1e-3
weight_decay = 0.0  # nanochat's SFT (below) uses none
