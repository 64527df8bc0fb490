"""
Export a checkpoint to a Hugging Face transformers directory: float32 safetensors weights, config.json and the
GPT-2 tokenizer files, so that other tools (lm-eval-harness, llama.cpp's GGUF converter, vLLM...) load it with

    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)

    python export.py --model=out/fineweb-40m                    # writes out/fineweb-40m/hf
    python export.py --model=out/fineweb-40m/last.pt --out=my-model

Learnable multipliers are merged into plain weights first (a tied model with trained per-token embedding
multipliers is untied to take them) and the padded vocabulary (50304) is cut back to GPT-2's 50257 tokens. The
GPT-2 architecture becomes a GPT2LMHeadModel: Linear weights transposed into HF's Conv1D layout, missing biases
(bias=False) as zeros, the GELU declared as trained (exact 'gelu' or tanh 'gelu_new'), the head tied as
trained, block_size as n_positions. The modern block (RoPE, RMSNorm, SwiGLU) becomes a
LlamaForCausalLM, or a Qwen3ForCausalLM with QK-norm. Switches that no stock class has (logit soft-cap, ReLU^2,
GPT-2 and modern parts mixed) stop with one line naming the switch. With --check (on by default) the directory
is loaded back with transformers and its logits are compared with the checkpoint's; a mismatch fails.
Needs `pip install transformers` (train.py does not). See docs/export-eval.md.
"""
import os
import re
import tempfile
from dataclasses import dataclass

import torch

from smallgpt.checkpoint import check_which, find_checkpoint, load_checkpoint, model_from_checkpoint
from smallgpt.config import parse_args
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.tokens import TIKTOKEN_CACHE_NAMES, get_tokenizer

GPT2_VOCAB = 50257  # GPT-2's real tokens; ids above are vocabulary padding and never targets
EOT = 50256  # <|endoftext|>


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
        return "gpt2"
    for key, want in (("norm", "rmsnorm"), ("mlp", "swiglu")):
        if getattr(cfg, key) != want:
            raise DataError(f"{key}={getattr(cfg, key)!r} with pos_emb='rope': Llama and Qwen3 have {key}={want!r}; no export")
    if cfg.qk_norm and cfg.bias:
        raise DataError("bias=True with qk_norm=True: Qwen3's MLP has no biases; no export")
    return "qwen3" if cfg.qk_norm else "llama"


# -----------------------------------------------------------------------------
# GPT-2 architecture -> GPT2LMHeadModel

def gpt2_config(cfg):
    """The GPT2Config of our GPTConfig (dropout 0: an export is for inference)."""
    transformers = import_transformers()
    return transformers.GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.mlp_hidden or 4 * cfg.n_embd, layer_norm_epsilon=1e-5,
        activation_function="gelu" if cfg.gelu_approximate == "none" else "gelu_new",  # HF's default is tanh
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOT, eos_token_id=EOT,
        tie_word_embeddings=cfg.tie_embeddings)


def gpt2_state_dict(model):
    """Our (multiplier-free) weights under HF GPT-2's names and layouts, float32."""
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for key in ("transformer.wte.weight", "lm_head.weight"):
        sd[key] = sd[key][:GPT2_VOCAB]  # [:V], never a negative slice
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


def llama_config(cfg, arch):
    """LlamaConfig or Qwen3Config of our GPTConfig. rope_theta as a keyword: transformers 5 folds it into
    rope_parameters, 4.x reads it directly. Our RMSNorms (blocks, final, q/k) all use eps 1e-5."""
    transformers = import_transformers()
    common = dict(vocab_size=GPT2_VOCAB, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden or 4 * cfg.n_embd,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                  head_dim=cfg.n_embd // cfg.n_head, max_position_embeddings=cfg.block_size, rms_norm_eps=1e-5,
                  rope_theta=cfg.rope_theta, hidden_act="silu", attention_bias=cfg.bias, attention_dropout=0.0,
                  tie_word_embeddings=cfg.tie_embeddings, bos_token_id=EOT, eos_token_id=EOT)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    return transformers.LlamaConfig(**common, mlp_bias=cfg.bias)


def llama_state_dict(model):
    """Our (multiplier-free) modern-block weights under HF Llama / Qwen3 names (same nn.Linear layout), float32."""
    sd = {}
    for key, value in model.state_dict().items():
        value = value.float()
        if key == "transformer.wte.weight":
            sd["model.embed_tokens.weight"] = value[:GPT2_VOCAB]
        elif key == "lm_head.weight":
            if not model.config.tie_embeddings:
                sd["lm_head.weight"] = value[:GPT2_VOCAB]
        elif key == "transformer.ln_f.weight":
            sd["model.norm.weight"] = value
        else:  # transformer.h.{i}.{module}.{weight|bias}
            layer, module, kind = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", key).groups()
            sd[f"model.layers.{layer}.{LLAMA_NAMES[module]}.{kind}"] = value
    return {k: v.contiguous() for k, v in sd.items()}


def to_hf(model):
    """The stock transformers model (float32) computing what our model computes: GPT2LMHeadModel,
    LlamaForCausalLM or Qwen3ForCausalLM."""
    if model.config.multipliers != "none" or model.token_scale is not None:
        raise ValueError("to_hf takes a plain model: call model.merge_multipliers(untie=True) first")
    transformers = import_transformers()
    arch = hf_architecture(model.config)
    if arch == "gpt2":
        config, sd = gpt2_config(model.config), gpt2_state_dict(model)
    else:
        config, sd = llama_config(model.config, arch), llama_state_dict(model)
    hf = transformers.AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # only a tied head and causal-mask buffers (persistent in some transformers versions) may be absent
    assert not unexpected and all(k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias"))
                                  for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


# -----------------------------------------------------------------------------
# Tokenizer and checks

def tokenizer_files():
    """encoder.json and vocab.bpe, the GPT-2 BPE files tiktoken keeps in its cache (it fetches them on first
    use, so no network is needed here once any script has tokenized)."""
    get_tokenizer()  # downloads them into the cache if they are not there yet
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")  # tiktoken's own search order
    paths = {name: os.path.join(cache, TIKTOKEN_CACHE_NAMES[name]) for name in ("encoder.json", "vocab.bpe")}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise DataError(f"GPT-2's {name} is not in tiktoken's cache ({path}): set TIKTOKEN_CACHE_DIR to the "
                            f"directory tiktoken caches its files in")
    return paths


def save_tokenizer(out, block_size):
    """GPT-2's tokenizer as a GPT2TokenizerFast in out (tokenizer.json, vocab.json, merges.txt...)."""
    import shutil
    transformers = import_transformers()
    files = tokenizer_files()
    with tempfile.TemporaryDirectory() as tmp:  # the file names from_pretrained reads in every transformers version
        shutil.copyfile(files["encoder.json"], os.path.join(tmp, "vocab.json"))
        shutil.copyfile(files["vocab.bpe"], os.path.join(tmp, "merges.txt"))
        tok = transformers.GPT2TokenizerFast.from_pretrained(tmp, model_max_length=block_size)
    tok.save_pretrained(out)


@torch.no_grad()
def compare_logits(model, out, seqs=3):
    """Load out with AutoModelForCausalLM and return the largest |logit difference| relative to the largest
    |logit| on `seqs` random sequences of up to 256 tokens (float32, CPU)."""
    transformers = import_transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    T = min(model.config.block_size, 256)
    idx = torch.randint(0, GPT2_VOCAB, (seqs, T), generator=torch.Generator().manual_seed(0))
    ours = model.eval().float()(idx)[0][..., :GPT2_VOCAB]
    theirs = hf(idx).logits
    return ((ours - theirs).abs().max() / ours.abs().max().clamp(min=1.0)).item()


def check_out_dir(out):
    """Refuse to write into a directory holding anything but an earlier export (a run directory's
    config.json would be overwritten)."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "model.safetensors")):
        raise ConfigError(f"out {out!r} is neither empty nor an earlier export: choose another --out")


# -----------------------------------------------------------------------------

def export(model, out):
    """Write model (multipliers merged) to out as a transformers directory with the GPT-2 tokenizer."""
    hf = to_hf(model)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)  # safetensors; writes the tied tensor once
    save_tokenizer(out, model.config.block_size)


def main(argv):
    cfg = parse_args(ExportConfig, argv)
    check_which(cfg.which)
    path = find_checkpoint(cfg.model, cfg.which)
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(path)), "hf")
    check_out_dir(out)
    tokenizer_files()  # before writing anything: offline without the BPE files, fail with nothing half-written
    model = model_from_checkpoint(load_checkpoint(path))
    if model.config.vocab_size < GPT2_VOCAB:
        raise DataError(f"{path} has vocab_size {model.config.vocab_size}: the export needs GPT-2's {GPT2_VOCAB} tokens")
    model.merge_multipliers(untie=True).eval()  # HF has no per-token embedding scale: untie to fold it
    export(model, out)
    print(f"exported {path} to {out}")
    if cfg.check:
        diff = compare_logits(model, out)
        if diff > 1e-4:
            raise DataError(f"the export in {out} does NOT reproduce {path}: logits differ by {diff:.2e} of their "
                            f"scale (allowed 1e-4); do not use it")
        print(f"check: transformers reproduces the checkpoint's logits (max difference {diff:.1e} of their scale)")


if __name__ == "__main__":
    run_main(main)
