"""
Export a checkpoint to a Hugging Face transformers directory: float32 safetensors weights, config.json and the
GPT-2 tokenizer files, so that other tools (lm-eval-harness, llama.cpp's GGUF converter, vLLM...) load it with

    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)

    python export.py --model=out/fineweb-40m                    # writes out/fineweb-40m/hf
    python export.py --model=out/fineweb-40m/last.pt --out=my-model

The GPT-2 architecture becomes a GPT2LMHeadModel: learnable multipliers are merged into plain weights first,
Linear weights are transposed into HF's Conv1D layout, the padded vocabulary (50304) is cut back to GPT-2's
50257 tokens, missing biases (bias=False) become zeros, the GELU is declared as trained (exact 'gelu' or tanh
'gelu_new'), the head stays tied and block_size becomes n_positions. With --check (on by default) the
directory is loaded back with transformers and its logits are compared with the checkpoint's; a mismatch
fails. Needs `pip install transformers` (train.py does not). See docs/export-eval.md.
"""
import os
import tempfile
from dataclasses import dataclass

import torch

from checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from config import parse_args
from errors import ConfigError, DataError, run_main
from tokens import TIKTOKEN_CACHE_NAMES, get_tokenizer

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
# GPT-2 architecture -> GPT2LMHeadModel

def gpt2_config(cfg):
    """The GPT2Config of our GPTConfig (dropout 0: an export is for inference)."""
    transformers = import_transformers()
    return transformers.GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, layer_norm_epsilon=1e-5,
        activation_function="gelu" if cfg.gelu_approximate == "none" else "gelu_new",  # HF's default is tanh
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOT, eos_token_id=EOT,
        tie_word_embeddings=True)


def gpt2_state_dict(model):
    """Our (multiplier-free) weights under HF GPT-2's names and layouts, float32."""
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte: HF re-ties it
        value = value.float()
        if key == "transformer.wte.weight":
            value = value[:GPT2_VOCAB]  # [:V], never a negative slice (empty when nothing is padded)
        sd[key] = value.t() if key.endswith(transposed) else value  # HF's Conv1D stores (in, out)
    if not model.config.bias:  # HF GPT-2 always has biases: zeros compute the same function
        for key, value in list(sd.items()):
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                sd[key[:-len("weight")] + "bias"] = torch.zeros_like(value)
            elif key.endswith(transposed):
                sd[key[:-len("weight")] + "bias"] = torch.zeros(value.size(1))
    return {k: v.contiguous() for k, v in sd.items()}


def to_gpt2(model):
    """A GPT2LMHeadModel (float32) computing what our GPT-2-architecture model computes."""
    transformers = import_transformers()
    hf = transformers.GPT2LMHeadModel(gpt2_config(model.config)).float()
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
    # only the tied head and causal-mask buffers (persistent in some transformers versions) may be absent
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
    hf = to_gpt2(model)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)  # safetensors; writes the tied tensor once
    save_tokenizer(out, model.config.block_size)


def main(argv):
    cfg = parse_args(ExportConfig, argv)
    if cfg.which not in ("best", "last"):
        raise ConfigError(f"which must be best or last, not {cfg.which!r}")
    path = find_checkpoint(cfg.model, cfg.which)
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(path)), "hf")
    check_out_dir(out)
    model = model_from_checkpoint(load_checkpoint(path))
    if model.config.vocab_size < GPT2_VOCAB:
        raise DataError(f"{path} has vocab_size {model.config.vocab_size}: the export needs GPT-2's {GPT2_VOCAB} tokens")
    model.merge_multipliers().eval()
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
