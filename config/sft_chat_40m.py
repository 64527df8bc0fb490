# Supervised fine-tuning (SFT) of the 40M modern model (config/train_fineweb_40m_modern.py) on conversations, for a
# 12 GB RTX 4070. Data: python data/chat/prepare.py conversations.jsonl --out_dir=data/chat --val_docs=500, e.g. a
# public chat set exported to .jsonl (docs/chat.md). The recipe is nanochat's scripts/chat_sft.py (karpathy/nanochat
# at 0c73e53): one epoch over the data, the pretraining learning rates x 0.8 (init_lr_frac), no warm-up, the last
# half a linear decay to 0 (warmdown_ratio 0.5, final_lr_frac 0: our 'wsd' with wsd_decay_frac=0.5, min_lr=0), no
# weight decay, Muon on the matrices. nanochat packs several conversations into each row; we train one a row (its
# padding costs compute, not quality). Not yet run on a GPU: the step count below is for ~100k conversations.
sft = True
init_from = "out/fineweb-40m-modern/best.pt"  # its architecture and weights; the optimizer starts afresh
data_dir = "data/chat"
out_dir = "out/chat-40m"
batch_size = 16  # conversations per micro-batch, each a row of block_size (1,024) tokens
gradient_accumulation_steps = 8  # 16 x 8 = 128 conversations per step
max_iters = 800  # one epoch of ~100k conversations (train.py prints the count: set conversations / 128)
optimizer = "muon"
muon_lr = 0.016  # 0.8 x the pretraining 0.02
adam_embed_lr = 2.9e-3  # 0.8 x 3.6e-3
learning_rate = 4e-4  # 0.8 x 5e-4: the gains and the schedule's peak
weight_decay = 0.0
muon_weight_decay = 0.0
muon_momentum_warmup = 0  # a fine-tune: full momentum from the start
warmup_iters = 0
lr_schedule = "wsd"
wsd_decay_frac = 0.5
lr_decay_iters = 800
min_lr = 0.0
eval_interval = 100
eval_iters = 20  # 20 x 16 = 320 held-out conversations
compile = True
