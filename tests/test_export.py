"""export.py: our checkpoints as transformers directories (logits, generation, tokenizer, entry point)."""
import pytest
import torch
from conftest import randomized_tiny_gpt, run_script

transformers = pytest.importorskip("transformers")

import export
from model import GPTConfig
from smallgpt.errors import ConfigError, DataError
from smallgpt.tokens import get_tokenizer

V = export.GPT2_VOCAB


def tiny(**overrides):
    """Every weight randomised, and an MLP whose pre-activations are where exact and tanh GELU differ."""
    return randomized_tiny_gpt(wide_mlp=True, **overrides)


def export_and_load(model, out):
    model.merge_multipliers(untie=True)  # as export.py does
    export.export(model, str(out))
    return transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()


@pytest.mark.parametrize("gelu,bias,multipliers,token_multipliers", [
    ("none", False, "none", False), ("tanh", False, "none", False), ("none", True, "none", False),
    ("tanh", True, "vector", False), ("none", False, "vector", True), ("none", False, "scalar", False)])
def test_transformers_logits_equal_ours(tmp_path, gelu, bias, multipliers, token_multipliers):
    """Trained per-token embedding multipliers cannot live in a tied GPT-2: the export unties the head to fold
    them into the embedding (tie_word_embeddings=False)."""
    model = tiny(gelu_approximate=gelu, bias=bias, multipliers=multipliers, token_multipliers=token_multipliers)
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(idx)[0][..., :V]  # before merging the multipliers
        hf = export_and_load(model, tmp_path)
        assert type(hf).__name__ == "GPT2LMHeadModel"
        assert hf.config.activation_function == {"none": "gelu", "tanh": "gelu_new"}[gelu]
        assert hf.config.n_positions == 16 and hf.config.vocab_size == V
        tied = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
        assert tied == (not token_multipliers) == hf.config.tie_word_embeddings
        torch.testing.assert_close(hf(idx).logits, expected, atol=1e-4, rtol=0)
    assert export.compare_logits(model, str(tmp_path)) < 1e-5
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))


def test_a_wrong_gelu_is_caught(tmp_path, monkeypatch):
    """The comparison can fail: the same weights declared with the other GELU fail the check's 1e-4 (the two
    GELUs differ by at most ~5e-4 near |x| = 2, so the margin is small; the right one gives ~1e-7)."""
    model = tiny(gelu_approximate="none")
    wrong = export.gpt2_config
    monkeypatch.setattr(export, "gpt2_config", lambda cfg: wrong(GPTConfig(**{**cfg.__dict__, "gelu_approximate": "tanh"})))
    export_and_load(model, tmp_path)
    assert export.compare_logits(model, str(tmp_path)) > 1e-4


def test_generate_runs_on_the_export_and_matches_ours(tmp_path):
    model = tiny()
    hf = export_and_load(model, tmp_path)
    prompt = torch.tensor([[464, 3290, 318]])
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=export.EOT)[0, 3:]
    ours = torch.cat(list(model.generate(prompt, 10, temperature=0, vocab_limit=V)))
    assert theirs.tolist() == ours.tolist()


def test_tokenizer_of_the_export_encodes_like_tiktoken(tmp_path):
    export.save_tokenizer(str(tmp_path), 16)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    enc = get_tokenizer()
    for text in ["Hello world", "  two  spaces\n\nand lines\t", "naïve café 日本語 🚀 'quotes' don't", "3.14159 + 2e10"]:
        assert tok(text)["input_ids"] == enc.encode_ordinary(text)
        assert tok.decode(enc.encode_ordinary(text)) == text
    assert tok.eos_token_id == export.EOT and len(tok) == V


@pytest.mark.slow
def test_export_entry_point_with_check(tmp_path):
    model = tiny(multipliers="vector")
    torch.save({"model": model.state_dict(), "model_args": model.config.__dict__}, tmp_path / "best.pt")
    result = run_script("export.py", f"--model={tmp_path}")
    assert "check: transformers reproduces" in result.stdout
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    result = run_script("export.py", f"--model={tmp_path}", f"--out={tmp_path}", check=False)  # the run directory
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "neither empty nor an earlier export" in result.stderr


def test_a_mismatch_fails_loudly(tmp_path, monkeypatch):
    model = tiny()
    torch.save({"model": model.state_dict(), "model_args": model.config.__dict__}, tmp_path / "best.pt")
    monkeypatch.setattr(export, "gpt2_state_dict", lambda m, f=export.gpt2_state_dict: {
        k: (v.t().contiguous() if k.endswith("attn.c_proj.weight") else v) for k, v in f(m).items()})  # a transpose forgotten
    with pytest.raises(DataError, match="does NOT reproduce"):
        export.main([f"--model={tmp_path}", f"--out={tmp_path / 'hf'}"])


def test_small_vocabulary_and_bad_which_are_one_line_errors(tmp_path):
    model = tiny(vocab_size=97)
    torch.save({"model": model.state_dict(), "model_args": model.config.__dict__}, tmp_path / "best.pt")
    with pytest.raises(DataError, match="vocab_size 97"):
        export.main([f"--model={tmp_path}"])
    with pytest.raises(ConfigError, match="which"):
        export.main([f"--model={tmp_path}", "--which=first"])
