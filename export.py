"""
Export a checkpoint to a Hugging Face transformers directory: float32 safetensors weights, config.json and the
tokenizer files (GPT-2's, or the checkpoint's own trained BPE), so that other tools (lm-eval-harness, llama.cpp's
GGUF converter, vLLM...) load it with

    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)

    python export.py --model=out/fineweb-40m                    # writes out/fineweb-40m/hf
    python export.py --model=out/fineweb-40m/last.pt --out=my-model

Learnable multipliers are merged into plain weights first (a tied model with trained per-token embedding
multipliers is untied to take them) and the padded vocabulary (50304) is cut back to the tokenizer's (GPT-2: 50257). The
GPT-2 architecture becomes a GPT2LMHeadModel: Linear weights transposed into HF's Conv1D layout, missing biases
(bias=False) as zeros, the GELU declared as trained (exact 'gelu' or tanh 'gelu_new'), the head tied as
trained, block_size as n_positions. The modern block (RoPE, RMSNorm, SwiGLU) becomes a
LlamaForCausalLM, or a Qwen3ForCausalLM with QK-norm; n_kv_head becomes num_key_value_heads. Switches that no
stock class has (logit soft-cap, ReLU^2, GPT-2 and modern parts mixed, grouped-query attention with learned
positions) stop with one line naming the switch. With --check (on by default) the directory
is loaded back with transformers and its logits are compared with the checkpoint's; a mismatch fails.
GPT-2's tokenizer files are made from tiktoken's GPT-2 encoding alone (GPT2_TIKTOKEN_FILE offline), the one file
training needs; a trained tokenizer's tokenizer.json is the checkpoint's, byte for byte. Everything is written into OUT.partial and moved to OUT only after the check passed: a kill or
a full disk never leaves a half-written export. Needs `pip install transformers` (train.py does not). See
docs/export-eval.md.
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
                                checkpoint_tokenizer, get_tokenizer)


@dataclass
class ExportConfig:
    model: str = "out"  # a training run's directory (best.pt, last.pt or nanoGPT's ckpt.pt) or a checkpoint file
    which: str = "best"  # 'best' | 'last': the checkpoint to read from a run directory (falls back to the other)
    out: str = ""  # the directory to write; empty = hf/ inside the run directory
    check: bool = True  # load the export back with transformers and compare its logits with the checkpoint's


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


def gpt2_state_dict(model, vocab):
    """Our (multiplier-free) weights under HF GPT-2's names and layouts, float32, the vocabulary cut to vocab."""
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for key in ("transformer.wte.weight", "lm_head.weight"):
        sd[key] = sd[key][:vocab]  # [:V], never a negative slice
    if model.config.tie_embeddings:
        del sd["lm_head.weight"]  # HF re-ties it
    for key in [k for k in sd if ".attn.c_q." in k]:  # our Q, K, V matrices are rows of HF's one c_attn
        sd[key.replace("c_q", "c_attn")] = torch.cat([sd.pop(key.replace("c_q", f"c_{x}")) for x in "qkv"])
    sd = {k: v.t() if k.endswith(transposed) else v for k, v in sd.items()}  # HF's Conv1D stores (in, out)
    if not model.config.bias:  # HF GPT-2 always has biases: zeros compute the same function
        for key, value in list(sd.items()):
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                sd[key[:-len("weight")] + "bias"] = torch.zeros_like(value)
            elif key.endswith(transposed):
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
    return ((ours - theirs).abs().max() / ours.abs().max().clamp(min=1.0)).item()


def check_out_dir(out):
    """Refuse to write over anything but an earlier export (a run directory's config.json would be overwritten)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out {out!r} is a file: choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "model.safetensors")):
        raise ConfigError(f"out {out!r} is neither empty nor an earlier export: choose another --out")


def new_file_mode():
    """The mode open() gives a new file under the user's umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def staged(out, size):
    """Write into out.partial and move it to out only when the body (writing, then --check) succeeded, so that a
    kill or an error never leaves a half-written export under out's name. A killed export's leftovers are removed
    first; an earlier export at out is replaced at the end. size (bytes, roughly) is for the message on a full
    disk."""
    tmp, old = f"{out}.partial", f"{out}.old"
    for leftover in (tmp, old):  # a killed export's unfinished directory, or the earlier export it was replacing
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
    os.makedirs(tmp)
    try:
        yield tmp
        for name in os.listdir(tmp):  # safetensors writes its file mode 0600, the others get the umask's mode
            os.chmod(os.path.join(tmp, name), new_file_mode())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(e):  # an OSError, or safetensors' own error quoting the OS message
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
            raise DataError(f"no space left on the device writing the export {out} (model.safetensors and the "
                            f"tokenizer: about {size / 1e6:,.0f} MB, {free / 1e6:,.0f} MB free); nothing was written "
                            f"and the partial files are removed") from e
        raise
    if os.path.exists(out):  # an earlier export (check_out_dir): moved aside, then deleted
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------

def export(model, out, tokenizer=GPT2):
    """Write model (multipliers merged) to the directory out as a transformers model with its tokenizer (the record
    its checkpoint carries), the padded vocabulary cut to the tokenizer's (a model made from HF GPT-2, of 50,257
    rows, keeps those: no reserved chat tokens)."""
    enc = get_tokenizer(tokenizer)
    vocab = min(model.config.vocab_size, enc.n_vocab)
    hf = to_hf(model, vocab, enc.eot_token)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)  # safetensors; writes the tied tensor once
    save_tokenizer(out, model.config.block_size, tokenizer, vocab)


def check_export(model, out, path):
    diff = compare_logits(model, out)
    if diff > 1e-4:
        raise DataError(f"the export of {path} does NOT reproduce it: logits differ by {diff:.2e} of their scale "
                        f"(allowed 1e-4); nothing was written")
    print(f"check: transformers reproduces the checkpoint's logits (max difference {diff:.1e} of their scale)")


def context_note(arch, block_size):
    """What the exported context length means: GPT-2 has no position embedding past it."""
    if arch == "gpt2":
        return (f"n_positions={block_size}, the training context: transformers' generate fails on prompt + new "
                f"tokens past {block_size}")
    return (f"max_position_embeddings={block_size}, the training context: longer text runs (RoPE) but was never "
            f"trained on")


def main(argv):
    cfg = parse_args(ExportConfig, argv)
    check_which(cfg.which)
    path = find_checkpoint(cfg.model, cfg.which)
    out = os.path.normpath(cfg.out or os.path.join(os.path.dirname(os.path.abspath(path)), "hf"))
    check_out_dir(out)
    import_transformers()  # first what no tokenizer can fix: transformers, then the model's architecture
    ckpt = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(ckpt), checkpoint_tokenizer(ckpt)
    arch = hf_architecture(model.config)
    enc = get_tokenizer(tokenizer)  # GPT-2: GPT2_TIKTOKEN_FILE, or tiktoken's own copy (its files are made from it)
    # a row for each token of text (GPT-2's reserved chat tokens are exported where the model has rows for them)
    if model.config.vocab_size < (enc.eot_token + 1 if tokenizer["name"] == GPT2["name"] else enc.n_vocab):
        raise DataError(f"{path} has vocab_size {model.config.vocab_size}: fewer than the tokens of its tokenizer "
                        f"({enc.name}, {enc.n_vocab})")
    model.merge_multipliers(untie=True).eval()  # HF has no per-token embedding scale: untie to fold it
    size = 4 * sum(p.numel() for p in model.parameters()) + 4_000_000  # float32 weights + ~4 MB of tokenizer
    with staged(out, size) as tmp:
        export(model, tmp, tokenizer)
        if cfg.check:
            check_export(model, tmp, path)
    print(f"exported {path} to {out} ({context_note(arch, model.config.block_size)})")


if __name__ == "__main__":
    run_main(main)
