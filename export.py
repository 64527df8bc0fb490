"""
Export a checkpoint to a Hugging Face transformers directory: float32 safetensors weights, config.json and the
tokenizer files (GPT-2's, or the checkpoint's own trained BPE), so that other tools (lm-eval-harness, vLLM...)
load it with

    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)

or, with --gguf, a GGUF file for llama.cpp and ollama (the same tensors in llama.cpp's layouts, the tokenizer in
its metadata; --gguf_type=f32|f16|bf16|q8_0), checked against llama.cpp itself where llama-cpp-python is installed.

    python export.py --model=out/fineweb-40m                    # writes out/fineweb-40m/hf
    python export.py --model=out/fineweb-40m/last.pt --out=my-model
    python export.py --model=out/fineweb-40m --gguf             # writes out/fineweb-40m/fineweb-40m-f16.gguf

Learnable multipliers are merged into plain weights first (a tied model with trained per-token embedding
multipliers is untied to take them) and the padded vocabulary (50304) is cut back to the tokenizer's (GPT-2: 50257). The
GPT-2 architecture becomes a GPT2LMHeadModel: Linear weights transposed into HF's Conv1D layout, missing biases
(bias=False) as zeros, the GELU declared as trained (exact 'gelu' or tanh 'gelu_new'), the head tied as
trained, block_size as n_positions. The modern block (RoPE, RMSNorm, SwiGLU) becomes a
LlamaForCausalLM, or a Qwen3ForCausalLM with QK-norm; n_kv_head becomes num_key_value_heads. Switches that no
stock class has (logit soft-cap, ReLU^2, GPT-2 and modern parts mixed, grouped-query attention with learned
positions) stop with one line naming the switch. With --check (on by default) the directory is loaded back with
transformers (the GGUF with llama.cpp) and its logits are compared with the checkpoint's; a mismatch fails.
GPT-2's tokenizer files are made from tiktoken's GPT-2 encoding alone (GPT2_TIKTOKEN_FILE offline), the one file
training needs; a trained tokenizer's tokenizer.json is the checkpoint's, byte for byte (no GGUF: llama.cpp has no
pre-tokenizer that splits text as prepare.py's BPE does). Everything is written into OUT.partial and moved to OUT
only after the check passed: a kill or a full disk never leaves a half-written export. Needs `pip install
transformers` (train.py does not). See docs/export-eval.md.
"""
import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch

from smallgpt.chat import CHAT_TEMPLATE
from smallgpt.checkpoint import check_which, find_checkpoint, load_checkpoint, model_from_checkpoint
from smallgpt.config import parse_args
from smallgpt.errors import ConfigError, DataError, out_of_space, run_main
from smallgpt.tokenizer import (EOT, GPT2, SPECIAL_TOKENS, TOKENIZER_FILE, bpe_split, bytes_to_unicode,
                                checkpoint_tokenizer, describe, get_tokenizer)


@dataclass
class ExportConfig:
    model: str = "out"  # a training run's directory (best.pt, last.pt or nanoGPT's ckpt.pt) or a checkpoint file
    which: str = "best"  # 'best' | 'last': the checkpoint to read from a run directory (falls back to the other)
    out: str = ""  # the directory to write (a .gguf file with --gguf); '' = hf/ (<run>-<type>.gguf) in the run directory
    check: bool = True  # run the export (transformers; llama.cpp for --gguf) and compare its logits with the checkpoint's
    gguf: bool = False  # write a GGUF file for llama.cpp / ollama instead of a transformers directory
    gguf_type: str = "f16"  # the GGUF's matrices: 'f32' | 'f16' | 'bf16' | 'q8_0' (norms, biases, positions stay f32)


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise DataError("export needs the transformers package: pip install transformers")
    transformers.logging.set_verbosity_error()  # no advice about generation settings on every load
    transformers.logging.disable_progress_bar()  # nor a progress bar for a one-file save
    return transformers


# -----------------------------------------------------------------------------
# Which HF architecture: GPT-2 (learned positions) or Llama / Qwen3 (the modern block)

def hf_architecture(cfg):
    """'gpt2', 'llama' or 'qwen3' (Llama with QK-norm) for a GPTConfig; a switch combination that no stock HF
    class computes is a DataError naming the switch."""
    if cfg.logit_softcap:
        raise DataError(f"logit_softcap={cfg.logit_softcap}: GPT-2, Llama and Qwen3 have no soft-capped logits; no export")
    if cfg.mlp == "relu2":
        raise DataError("mlp='relu2': no HF GPT-2, Llama or Qwen3 MLP squares a ReLU; no export")
    if cfg.pos_emb == "learned":  # GPT2LMHeadModel is the stock model with a position table
        for key, want in (("norm", "layernorm"), ("mlp", "gelu"), ("qk_norm", False)):
            if getattr(cfg, key) != want:
                raise DataError(f"{key}={getattr(cfg, key)!r} with pos_emb='learned': GPT2LMHeadModel, the HF model "
                                f"with learned positions, has {key}={want!r}; no export")
        if cfg.kv_heads != cfg.n_head:
            raise DataError(f"n_kv_head={cfg.n_kv_head} with pos_emb='learned': GPT2LMHeadModel has no grouped-query "
                            f"attention; no export")
        return "gpt2"
    for key, want in (("norm", "rmsnorm"), ("mlp", "swiglu")):
        if getattr(cfg, key) != want:
            raise DataError(f"{key}={getattr(cfg, key)!r} with pos_emb='rope': Llama and Qwen3 have {key}={want!r}; no export")
    if cfg.qk_norm and cfg.bias:
        raise DataError("bias=True with qk_norm=True: Qwen3's MLP has no biases; no export")
    return "qwen3" if cfg.qk_norm else "llama"


# -----------------------------------------------------------------------------
# GPT-2 architecture -> GPT2LMHeadModel

def gpt2_config(cfg, vocab, eot):
    """The GPT2Config of our GPTConfig for a tokenizer of vocab tokens (dropout 0: an export is for inference)."""
    transformers = import_transformers()
    return transformers.GPT2Config(
        vocab_size=vocab, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.mlp_hidden or 4 * cfg.n_embd, layer_norm_epsilon=1e-5,
        activation_function="gelu" if cfg.gelu_approximate == "none" else "gelu_new",  # HF's default is tanh
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot,
        tie_word_embeddings=cfg.tie_embeddings)


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # HF stores (in, out)


def gpt2_state_dict(model, vocab):
    """Our (multiplier-free) weights under HF GPT-2's names and layouts, float32, the vocabulary cut to vocab."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for key in ("transformer.wte.weight", "lm_head.weight"):
        sd[key] = sd[key][:vocab]  # [:V], never a negative slice
    if model.config.tie_embeddings:
        del sd["lm_head.weight"]  # HF re-ties it
    for key in [k for k in sd if ".attn.c_q." in k]:  # our Q, K, V matrices are rows of HF's one c_attn
        sd[key.replace("c_q", "c_attn")] = torch.cat([sd.pop(key.replace("c_q", f"c_{x}")) for x in "qkv"])
    sd = {k: v.t() if k.endswith(CONV1D) else v for k, v in sd.items()}  # HF's Conv1D stores (in, out)
    if not model.config.bias:  # HF GPT-2 always has biases: zeros compute the same function
        for key, value in list(sd.items()):
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                sd[key[:-len("weight")] + "bias"] = torch.zeros_like(value)
            elif key.endswith(CONV1D):
                sd[key[:-len("weight")] + "bias"] = torch.zeros(value.size(1))
    return {k: v.contiguous() for k, v in sd.items()}


# -----------------------------------------------------------------------------
# The modern block -> LlamaForCausalLM / Qwen3ForCausalLM (same key names; Qwen3 adds q_norm / k_norm)

LLAMA_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_q": "self_attn.q_proj",
               "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj", "attn.c_proj": "self_attn.o_proj",
               "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm", "mlp.c_gate": "mlp.gate_proj",
               "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def llama_config(cfg, arch, vocab, eot):
    """LlamaConfig or Qwen3Config of our GPTConfig. rope_theta as a keyword: transformers 5 folds it into
    rope_parameters, 4.x reads it directly. Our RMSNorms (blocks, final, q/k) all use eps 1e-5."""
    transformers = import_transformers()
    common = dict(vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden or 4 * cfg.n_embd,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.n_embd // cfg.n_head, max_position_embeddings=cfg.block_size, rms_norm_eps=1e-5,
                  rope_theta=cfg.rope_theta, hidden_act="silu", attention_bias=cfg.bias, attention_dropout=0.0,
                  tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eot, eos_token_id=eot)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    return transformers.LlamaConfig(**common, mlp_bias=cfg.bias)


def llama_state_dict(model, vocab):
    """Our (multiplier-free) modern-block weights under HF Llama / Qwen3 names (same nn.Linear layout), float32."""
    sd = {}
    for key, value in model.state_dict().items():
        value = value.float()
        if key == "transformer.wte.weight":
            sd["model.embed_tokens.weight"] = value[:vocab]
        elif key == "lm_head.weight":
            if not model.config.tie_embeddings:
                sd["lm_head.weight"] = value[:vocab]
        elif key == "transformer.ln_f.weight":
            sd["model.norm.weight"] = value
        else:  # transformer.h.{i}.{module}.{weight|bias}
            layer, module, kind = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", key).groups()
            sd[f"model.layers.{layer}.{LLAMA_NAMES[module]}.{kind}"] = value
    return {k: v.contiguous() for k, v in sd.items()}


def to_hf(model, vocab, eot):
    """The stock transformers model (float32) computing what our model computes over a tokenizer's vocab ids (the
    padded rows cut; eot: its end-of-text id): GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM."""
    if model.config.multipliers != "none" or model.token_scale is not None:
        raise ValueError("to_hf takes a plain model: call model.merge_multipliers(untie=True) first")
    transformers = import_transformers()
    arch = hf_architecture(model.config)
    if arch == "gpt2":
        config, sd = gpt2_config(model.config, vocab, eot), gpt2_state_dict(model, vocab)
    else:
        config, sd = llama_config(model.config, arch, vocab, eot), llama_state_dict(model, vocab)
    hf = transformers.AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # only a tied head and causal-mask buffers (persistent in some transformers versions) may be absent
    assert not unexpected and all(k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias"))
                                  for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


# -----------------------------------------------------------------------------
# The tokenizer: GPT-2's from tiktoken's encoding alone (GPT2_TIKTOKEN_FILE, or tiktoken's own copy: the same file
# training needs, nothing more), or the checkpoint's trained tokenizer.json as it is

def gpt2_vocab_and_merges(enc):
    """GPT-2's encoder.json and vocab.bpe, rebuilt from a tiktoken GPT-2 encoding: the vocabulary maps each
    token's bytes, written in byte-level BPE's printable characters, to its rank; the merge that makes a token
    is the pair of parts that tiktoken's own algorithm, allowed only the lower ranks, splits it into (the list
    equals GPT-2's vocab.bpe, tested)."""
    eot = enc.eot_token  # 50256: the ranks are 0..50255
    ranks = {enc.decode_single_token_bytes(i): i for i in range(eot)}  # public API: rank i is token i
    chars = bytes_to_unicode()  # byte -> the printable character byte-level BPE stores it as
    text = lambda token: "".join(chars[b] for b in token)
    merges = []
    for token, rank in ranks.items():  # in rank order, the order of vocab.bpe
        if len(token) > 1:
            left, right = bpe_split(ranks, token, rank)  # always two parts for a GPT-2 token
            merges.append(f"{text(left)} {text(right)}")
    return {**{text(t): r for t, r in ranks.items()}, EOT: eot}, merges


def save_tokenizer(out, block_size, tokenizer=GPT2, vocab=None):
    """The tokenizer of record `tokenizer` in out (tokenizer.json, tokenizer_config.json), for AutoTokenizer; vocab:
    the model's ids (GPT-2's reserved chat tokens are written where the model has rows for them; None: all)."""
    if tokenizer["name"] == GPT2["name"]:
        save_gpt2_tokenizer(out, block_size, get_tokenizer(GPT2), vocab)
    else:
        save_trained_tokenizer(out, block_size, tokenizer)


def save_trained_tokenizer(out, block_size, tokenizer):
    """A trained BPE: its tokenizer.json byte for byte (eval.py recognises it by its hash), and a config naming
    PreTrainedTokenizerFast (transformers 4.x and 5.x load it), <|endoftext|> as BOS and EOS, and the reserved
    special tokens as such."""
    import json
    with open(os.path.join(out, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        f.write(tokenizer["json"])
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=EOT, eos_token=EOT, model_max_length=block_size,
                  clean_up_tokenization_spaces=False, additional_special_tokens=list(SPECIAL_TOKENS[1:]),
                  chat_template=CHAT_TEMPLATE)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def save_gpt2_tokenizer(out, block_size, enc, vocab=None):
    """GPT-2's tokenizer in out (tokenizer.json, tokenizer_config.json): transformers' own GPT-2 tokenizer class
    read from the vocab.json and merges.txt rebuilt from enc, the file names every transformers version reads
    (so 4.x loads the export too: its tokenizer_class is GPT2Tokenizer), then the reserved chat tokens (their ids
    below vocab) as special tokens: added in order, they take 50257, 50258, ... as in enc."""
    import json
    transformers = import_transformers()
    vocab_json, merges = gpt2_vocab_and_merges(enc)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab_json, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = transformers.GPT2TokenizerFast.from_pretrained(tmp, model_max_length=block_size)
    chat = [name for name in SPECIAL_TOKENS[1:] if enc.encode_single_token(name) < (vocab or enc.n_vocab)]
    tok.add_special_tokens({"additional_special_tokens": chat})
    assert [tok.convert_tokens_to_ids(name) for name in chat] == [enc.encode_single_token(name) for name in chat]
    tok.save_pretrained(out)
    # transformers 5 writes the list as extra_special_tokens, which 4.x cannot load; both read this name
    path = os.path.join(out, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["additional_special_tokens"] = config.pop("extra_special_tokens", chat)
    if len(chat) == len(SPECIAL_TOKENS) - 1:  # the model has rows for the chat markers: apply_chat_template works
        config["chat_template"] = CHAT_TEMPLATE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


# -----------------------------------------------------------------------------
# GGUF for llama.cpp and ollama: the export's tensors (the HF ones above) under llama.cpp's names and layouts,
# written with the gguf package (ggml's own); its metadata says everything llama.cpp needs, tokenizer included

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_quiet = None  # the llama.cpp log callback that drops its messages (referenced for as long as llama.cpp may call it)


def check_gguf_architecture(cfg, arch):
    """llama.cpp's GPT-2 graph computes the tanh GELU (ggml_gelu, whatever the config says): an exact-GELU model
    would silently run another function, so it is refused."""
    if arch == "gpt2" and cfg.gelu_approximate != "tanh":
        raise DataError(f"gelu_approximate={cfg.gelu_approximate!r}: llama.cpp's GPT-2 computes the tanh GELU only; "
                        f"no GGUF (a model trained with gelu_approximate='tanh', or the modern block, exports)")


def rope_interleaved(w, n_head):
    """Rows of a Llama q/k projection (weight or bias) from rotate-half order (HF, ours: each head's first half
    pairs with its second half) to the adjacent pairs llama.cpp's Llama RoPE rotates (Qwen3 keeps rotate-half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_gguf_tokenizer(tokenizer):
    """llama.cpp splits text before BPE with the regex its `tokenizer.ggml.pre` name selects: GPT-2's has one
    ('gpt-2'); prepare.py's (GPT-4's split) has none: the nearest, 'llama-bpe', splits trailing whitespace after a
    newline otherwise ('\\n ' is one piece here, two there), so a trained tokenizer's GGUF would encode other tokens."""
    if tokenizer["name"] != GPT2["name"]:
        raise DataError(f"no GGUF for a model of a trained tokenizer ({describe(tokenizer)}): llama.cpp has no "
                        f"pre-tokenizer that splits text as it does (GPT-4's split); export without --gguf")


def gguf_tensors(model, arch, vocab):
    """{llama.cpp name: float32 tensor} of the export's HF tensors: GPT-2's Conv1D matrices back to (out, in),
    Llama's q/k rows interleaved; names from gguf's own HF -> GGUF map (a tied head is absent: llama.cpp
    reuses token_embd)."""
    import gguf
    sd = gpt2_state_dict(model, vocab) if arch == "gpt2" else llama_state_dict(model, vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.n_layer)
    out = {}
    for key, value in sd.items():
        if arch == "gpt2" and key.endswith(CONV1D):
            value = value.t()
        if arch == "llama" and (".self_attn.q_proj." in key or ".self_attn.k_proj." in key):
            value = rope_interleaved(value, model.config.n_head if ".q_proj." in key else model.config.kv_heads)
        out[names.get_name(key, try_suffixes=(".weight", ".bias"))] = value.contiguous()
    return out


def gguf_tensor_type(name, value, gguf_type):
    """As llama.cpp's converter: vectors (norms, biases) and the position table stay float32."""
    import gguf
    if value.dim() == 1 or name.startswith("position_embd"):
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType[gguf_type.upper()]


def add_gguf_tokenizer(writer, enc, vocab):
    """GPT-2's BPE cut to vocab ids (tokens by id, merges by rank; <|endoftext|> and the reserved chat tokens as
    control tokens, <|endoftext|> as BOS/EOS/UNK), its pre-tokenizer name and the chat template."""
    import gguf
    names, merges = gpt2_vocab_and_merges(enc)  # {token text: id} of the ids up to <|endoftext|>
    specials = {enc.encode_single_token(name): name for name in SPECIAL_TOKENS}
    tokens = {**{i: text for text, i in names.items()}, **specials}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split pattern (llama.cpp's default one differs)
    writer.add_token_list([tokens[i] for i in range(vocab)])
    writer.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(vocab)])
    writer.add_token_merges(merges)
    for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id):
        add(enc.eot_token)  # llama.cpp's defaults for a 'gpt2' vocabulary are 11
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if all(i < vocab for i in specials):  # the model has rows for the chat markers: as the transformers export
        writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf(model, path, arch, gguf_type, enc, name):
    """model (multipliers merged) as a GGUF file of gguf_type for llama.cpp's gpt2, llama or qwen3, with GPT-2's
    tokenizer (enc; check_gguf_tokenizer refuses the others)."""
    import gguf
    cfg, vocab = model.config, exported_vocab(model, enc)
    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[{"f32": "ALL_F32"}.get(gguf_type, f"MOSTLY_{gguf_type.upper()}")])
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden or 4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)  # grouped-query attention: fewer key/value heads
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        head_dim = cfg.n_embd // cfg.n_head
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    add_gguf_tokenizer(writer, enc, vocab)
    for tensor_name, value in gguf_tensors(model, arch, vocab).items():
        qtype = gguf_tensor_type(tensor_name, value, gguf_type)
        try:
            data = gguf.quants.quantize(value.numpy(), qtype)
        except gguf.QuantError:  # q8_0 needs rows of a multiple of 32 values: float16, as the converter does
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(value.numpy(), qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)  # a progress bar: a 124M model is ~250 MB of f16
    writer.close()


# -----------------------------------------------------------------------------
# Checks

@torch.no_grad()
def compare_logits(model, out, seqs=3):
    """Load out with AutoModelForCausalLM and return the largest |logit difference| relative to the largest
    |logit| on `seqs` random sequences of up to 256 tokens of its vocabulary (float32, CPU)."""
    transformers = import_transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    T, V = min(model.config.block_size, 256), hf.config.vocab_size
    idx = torch.randint(0, V, (seqs, T), generator=torch.Generator().manual_seed(0))
    ours = model.eval().float()(idx)[0][..., :V]
    theirs = hf(idx).logits
    return relative_difference(ours, theirs)


def relative_difference(ours, theirs):
    """The largest |logit difference| relative to the largest |logit| (at least 1)."""
    return ((ours - theirs).abs().max() / ours.abs().max().clamp(min=1.0)).item()


# llama.cpp vs our model, relative to the logits' scale, measured on tiny trained models (docs/export-eval.md)
# with a float32 KV cache: f32 is exact up to summation order, but GPT-2's GELU runs from a float16 table in
# ggml; the other types round the weights (and llama.cpp rounds the activations to match them)
GGUF_TOLERANCE = {"f32": 1e-4, "f32 gpt2": 2e-3, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}
CHECK_TEXTS = ["The history of the bicycle begins in the early nineteenth century, when inventors in Germany and "
               "France built wooden machines that riders pushed along with their feet.",
               "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife."]


@torch.no_grad()
def llama_cpp_check(model, path, arch, gguf_type, enc):
    """Run the GGUF in llama.cpp (llama-cpp-python) on fixed texts: its logits must be within the type's tolerance
    of ours and its greedy continuation the same. Returns a line saying what was checked."""
    try:
        import llama_cpp
    except ImportError:
        return ("check: not run: llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp: "
                "24 minutes on a busy 2-core machine)")
    global _quiet  # llama.cpp logs to stderr (a context-length warning on every load of a small model): dropped
    _quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_quiet, None)
    T, V = model.config.block_size, exported_vocab(model, enc)
    prompts = [enc.encode_ordinary(text)[:T] for text in CHECK_TEXTS]
    try:  # a float32 KV cache: llama.cpp's default float16 one alone moves the logits by ~1e-2
        llm = llama_cpp.Llama(model_path=path, n_ctx=T, n_batch=T, logits_all=True, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    except ValueError as e:
        raise DataError(f"llama.cpp cannot load the GGUF ({e}); nothing was written")
    diff = 0.0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
        diff = max(diff, relative_difference(model(torch.tensor([ids]))[0][0, :, :V], theirs))
    prompt, n_new = prompts[0][:T // 2], min(16, T - T // 2)
    ours = [t.item() for t in model.generate(torch.tensor([prompt]), n_new, temperature=0, vocab_limit=V)]
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(n_new):
        theirs.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(theirs[-1:])
    llm.close()
    allowed = GGUF_TOLERANCE.get(f"{gguf_type} {arch}", GGUF_TOLERANCE[gguf_type])
    if diff > allowed or theirs != ours:
        raise DataError(f"llama.cpp does NOT reproduce {path}'s model: logits differ by {diff:.2e} of their scale "
                        f"(allowed {allowed:.0e} for {gguf_type}), greedy continuation "
                        f"{'the same' if theirs == ours else 'different'}; nothing was written")
    return (f"check: llama.cpp reproduces the checkpoint's logits (max difference {diff:.1e} of their scale, allowed "
            f"{allowed:.0e} for {gguf_type}) and its greedy continuation ({n_new} tokens)")


def check_out(out, gguf):
    """Refuse to write over anything but an earlier export (a run directory's config.json would be overwritten)."""
    if gguf:
        if not out.endswith(".gguf") or os.path.isdir(out):
            raise ConfigError(f"out {out!r} is not a .gguf file name: with --gguf, --out names the file to write")
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out {out!r} is a file: choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "model.safetensors")):
        raise ConfigError(f"out {out!r} is neither empty nor an earlier export: choose another --out")


# -----------------------------------------------------------------------------
# Writing safely: elsewhere first, moved into place once complete and checked

def new_file_mode():
    """The mode open() gives a new file under the user's umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def staged(out, size, what):
    """Yield out.partial to write (the transformers directory, or the GGUF file) and move it to out only when the
    body (writing, then --check) succeeded, so that a kill or an error never leaves a half-written export under
    out's name. A killed export's leftovers are removed first; an earlier export at out is replaced at the end.
    size (bytes, roughly) and what (the files) are for the message on a full disk."""
    tmp, old = f"{out}.partial", f"{out}.old"
    for leftover in (tmp, old):  # a killed export's unfinished copy, or the earlier export it was replacing
        remove(leftover)
    try:
        yield tmp
        files = [os.path.join(tmp, name) for name in os.listdir(tmp)] if os.path.isdir(tmp) else [tmp]
        for file in files:  # safetensors writes its file mode 0600, the others get the umask's mode
            os.chmod(file, new_file_mode())
    except BaseException as e:
        remove(tmp)
        if out_of_space(e):  # an OSError, or safetensors' own error quoting the OS message
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
            raise DataError(f"no space left on the device writing the export {out} ({what}: about {size / 1e6:,.0f} "
                            f"MB, {free / 1e6:,.0f} MB free); nothing was written and the partial files are "
                            f"removed") from e
        raise
    if os.path.isdir(out):  # a directory cannot be replaced by a rename: moved aside, then deleted
        os.replace(out, old)
    os.replace(tmp, out)
    remove(old)


# -----------------------------------------------------------------------------

def exported_vocab(model, enc):
    """How many token ids the export has: the tokenizer's, cut to the model's rows (a model made from HF GPT-2,
    of 50,257 rows, has no reserved chat tokens)."""
    return min(model.config.vocab_size, enc.n_vocab)


def export(model, out, tokenizer=GPT2):
    """Write model (multipliers merged) to the directory out as a transformers model with its tokenizer (the record
    its checkpoint carries), the padded vocabulary cut to the tokenizer's (a model made from HF GPT-2, of 50,257
    rows, keeps those: no reserved chat tokens)."""
    enc = get_tokenizer(tokenizer)
    vocab = exported_vocab(model, enc)
    hf = to_hf(model, vocab, enc.eot_token)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)  # safetensors; writes the tied tensor once
    save_tokenizer(out, model.config.block_size, tokenizer, vocab)


def check_export(model, out, path):
    diff = compare_logits(model, out)
    if diff > 1e-4:
        raise DataError(f"the export of {path} does NOT reproduce it: logits differ by {diff:.2e} of their scale "
                        f"(allowed 1e-4); nothing was written")
    return f"check: transformers reproduces the checkpoint's logits (max difference {diff:.1e} of their scale)"


def context_note(arch, block_size, gguf):
    """What the exported context length means: GPT-2 has no position embedding past it."""
    key = "context_length" if gguf else "n_positions" if arch == "gpt2" else "max_position_embeddings"
    if arch == "gpt2":
        runner = "llama.cpp aborts on" if gguf else "transformers' generate fails on"
        return f"{key}={block_size}, the training context: {runner} prompt + new tokens past {block_size}"
    return f"{key}={block_size}, the training context: longer text runs (RoPE) but was never trained on"


def default_out(path, cfg):
    run_dir = os.path.dirname(os.path.abspath(path))
    if cfg.gguf:
        return os.path.join(run_dir, f"{os.path.basename(run_dir)}-{cfg.gguf_type}.gguf")
    return os.path.join(run_dir, "hf")


def main(argv):
    cfg = parse_args(ExportConfig, argv)
    check_which(cfg.which)
    if cfg.gguf_type not in GGUF_TYPES:
        raise ConfigError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, not {cfg.gguf_type!r}")
    path = find_checkpoint(cfg.model, cfg.which)
    out = os.path.normpath(cfg.out or default_out(path, cfg))
    check_out(out, cfg.gguf)
    import_transformers()  # first what no tokenizer can fix: transformers, then the model's architecture
    ckpt = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(ckpt), checkpoint_tokenizer(ckpt)
    arch = hf_architecture(model.config)
    if cfg.gguf:
        check_gguf_architecture(model.config, arch)
        check_gguf_tokenizer(tokenizer)
    enc = get_tokenizer(tokenizer)  # GPT-2: GPT2_TIKTOKEN_FILE, or tiktoken's own copy (its files are made from it)
    # a row for each token of text (GPT-2's reserved chat tokens are exported where the model has rows for them)
    if model.config.vocab_size < (enc.eot_token + 1 if tokenizer["name"] == GPT2["name"] else enc.n_vocab):
        raise DataError(f"{path} has vocab_size {model.config.vocab_size}: fewer than the tokens of its tokenizer "
                        f"({enc.name}, {enc.n_vocab})")
    model.merge_multipliers(untie=True).eval()  # HF has no per-token embedding scale: untie to fold it
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.gguf:
        size = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}[cfg.gguf_type] * n_params + 2_000_000  # + tokenizer
        with staged(out, size, "the GGUF file") as tmp:
            write_gguf(model, tmp, arch, cfg.gguf_type, enc, os.path.basename(out)[:-len(".gguf")])
            checked = llama_cpp_check(model, tmp, arch, cfg.gguf_type, enc) if cfg.check else ""
    else:
        with staged(out, 4 * n_params + 4_000_000, "model.safetensors and the tokenizer") as tmp:  # + tokenizer
            export(model, tmp, tokenizer)
            checked = check_export(model, tmp, path) if cfg.check else ""
    if checked:
        print(checked)
    print(f"exported {path} to {out} ({context_note(arch, model.config.block_size, cfg.gguf)})")


if __name__ == "__main__":
    run_main(main)
