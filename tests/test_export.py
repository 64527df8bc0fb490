"""export.py: our checkpoints as transformers directories (logits, generation, tokenizer, entry point), written
so that a kill or a full disk never leaves a half-written export."""
import json
import os

import pytest
import torch
from conftest import SAMPLE_PARQUET, SHARED_DATA, needs_tokenizer, randomized_tiny_gpt, run_script, run_with_fault

transformers = pytest.importorskip("transformers")

import export
from model import GPTConfig
from smallgpt.errors import ConfigError, DataError
from smallgpt.tokenizer import get_tokenizer

V, EOT = 50267, 50256  # GPT-2's tokens and the reserved chat tokens (the padded ids above are cut); <|endoftext|>


def tiny(**overrides):
    """Every weight randomised, and an MLP whose pre-activations are where exact and tanh GELU differ."""
    return randomized_tiny_gpt(wide_mlp=True, **overrides)


def checkpoint(model):
    return {"model": model.state_dict(), "model_args": model.config.__dict__}


def export_and_load(model, out):
    model.merge_multipliers(untie=True)  # as export.py does
    export.export(model, str(out))
    return transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()


@pytest.mark.parametrize("gelu,bias,multipliers,token_multipliers", [
    ("none", False, "none", False), ("tanh", False, "none", False), ("none", True, "none", False),
    ("tanh", True, "vector", False), ("none", False, "vector", True), ("none", False, "scalar", False)])
@needs_tokenizer
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


@needs_tokenizer
def test_a_wrong_gelu_is_caught(tmp_path, monkeypatch):
    """The comparison can fail: the same weights declared with the other GELU fail the check's 1e-4 (the two
    GELUs differ by at most ~5e-4 near |x| = 2, so the margin is small; the right one gives ~1e-7)."""
    model = tiny(gelu_approximate="none")
    wrong = export.gpt2_config
    monkeypatch.setattr(export, "gpt2_config", lambda cfg, *args: wrong(GPTConfig(**{**cfg.__dict__, "gelu_approximate": "tanh"}), *args))
    export_and_load(model, tmp_path)
    assert export.compare_logits(model, str(tmp_path)) > 1e-4


@needs_tokenizer
def test_generate_runs_on_the_export_and_matches_ours(tmp_path):
    model = tiny()
    hf = export_and_load(model, tmp_path)
    prompt = torch.tensor([[464, 3290, 318]])
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=EOT)[0, 3:]
    ours = torch.cat(list(model.generate(prompt, 10, temperature=0, vocab_limit=V)))
    assert theirs.tolist() == ours.tolist()


# texts where byte-level BPE implementations part: whitespace runs and kinds, split characters, emoji sequences,
# combining marks, control characters, long repeats, contractions, digits
HARD_TEXTS = ["Hello world", "  two  spaces\n\nand lines\t", "naïve café 日本語 🚀 'quotes' don't", "3.14159 + 2e10",
              "tabs\tand\r\nCRLF\u00a0NBSP\u2028LS \u3000ideographic", "trailing   ", "   leading", " \n \n\n  x",
              "👩🏽‍💻 🏳️‍🌈 🇯🇵 1️⃣ 👨‍👩‍👧", "e\u0301 a\u0308\u0323 Z\u0336", "\x00\x01\x1b[0m\x7f", "ab" * 300,
              "I'm they've we'll she'd IT'S 'S", "1234567890 ١٢٣ ⅻ", "def f(x):\n    return x ** 2  # sq\n",
              "Привет, мир. Γειά σου. مرحبا. שלום. नमस्ते", "<|endoftext|> as text", ""]


def assert_encodes_like_tiktoken(tok, enc, texts):
    """split_special_tokens: '<|endoftext|>' written in a text is text, as tiktoken's encode_ordinary has it."""
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert tok(text, split_special_tokens=True)["input_ids"] == ids, text
        assert tok.decode(ids) == text


def test_tokenizer_of_the_export_encodes_like_tiktoken(tmp_path, enc):
    export.save_tokenizer(str(tmp_path), 16)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_encodes_like_tiktoken(tok, enc, HARD_TEXTS)
    assert tok.eos_token_id == tok.bos_token_id == EOT and len(tok) == V and tok.model_max_length == 16
    assert tok("<|endoftext|>")["input_ids"] == [EOT]  # the special token itself, when not split
    # the reserved chat tokens at our ids, as special tokens
    assert tok("a<|user_start|>b<|output_end|>")["input_ids"] == enc.encode("a<|user_start|>b<|output_end|>",
                                                                             allowed_special="all")
    assert tok.all_special_ids == list(range(EOT, V))
    config = json.load(open(tmp_path / "tokenizer_config.json"))
    assert config["tokenizer_class"] == "GPT2Tokenizer" and "extra_special_tokens" not in config  # 4.x reads it
    export.save_tokenizer(str(tmp_path), 16, vocab=50257)  # a model from HF GPT-2: no rows for the chat tokens
    assert len(transformers.AutoTokenizer.from_pretrained(str(tmp_path))) == 50257


@pytest.mark.skipif(not (SHARED_DATA / "vocab.bpe").exists(), reason=f"no GPT-2 vocab.bpe in {SHARED_DATA}")
def test_vocabulary_and_merges_rebuilt_from_tiktoken_equal_gpt2s_files(enc):
    """The export needs only tiktoken's encoding (one file, gpt2.tiktoken); what it rebuilds equals GPT-2's own
    encoder.json and vocab.bpe."""
    vocab, merges = export.gpt2_vocab_and_merges(enc)
    assert vocab == json.load(open(SHARED_DATA / "encoder.json", encoding="utf-8"))
    assert merges == (SHARED_DATA / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:50001]  # after #version


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "gpt2.tiktoken").exists(), reason=f"no gpt2.tiktoken in {SHARED_DATA}")
def test_export_needs_only_gpt2_tiktoken(tmp_path):
    """With GPT2_TIKTOKEN_FILE set and an empty tiktoken cache (no encoder.json, no vocab.bpe anywhere), the
    entry point exports, and its tokenizer encodes 2,000 real documents exactly as tiktoken does."""
    torch.save(checkpoint(tiny()), tmp_path / "best.pt")
    (tmp_path / "empty-cache").mkdir()
    env = {"GPT2_TIKTOKEN_FILE": str(SHARED_DATA / "gpt2.tiktoken"), "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
           "DATA_GYM_CACHE_DIR": None, "HF_HUB_OFFLINE": "1"}
    result = run_with_fault("", "export.py", f"--model={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr
    assert not os.listdir(tmp_path / "empty-cache")  # nothing fetched into tiktoken's cache
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    texts = HARD_TEXTS
    if SAMPLE_PARQUET.exists():
        import pyarrow.parquet as pq
        texts = texts + pq.read_table(SAMPLE_PARQUET, columns=["text"]).column(0).to_pylist()[::10][:2000]
    assert_encodes_like_tiktoken(tok, get_tokenizer(), texts)


@pytest.mark.slow
@needs_tokenizer
def test_export_entry_point_with_check(tmp_path):
    model = tiny(multipliers="vector")
    torch.save(checkpoint(model), tmp_path / "best.pt")
    result = run_script("export.py", f"--model={tmp_path}")
    assert "check: transformers reproduces" in result.stdout
    assert "n_positions=16, the training context" in result.stdout.splitlines()[-1]  # generate fails past it
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    result = run_script("export.py", f"--model={tmp_path}", f"--out={tmp_path}", check=False)  # the run directory
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "neither empty nor an earlier export" in result.stderr


@needs_tokenizer
def test_a_mismatch_fails_loudly_and_writes_nothing(tmp_path, monkeypatch):
    model = tiny()
    torch.save(checkpoint(model), tmp_path / "best.pt")
    monkeypatch.setattr(export, "gpt2_state_dict", lambda m, vocab, f=export.gpt2_state_dict: {
        k: (v.t().contiguous() if k.endswith("attn.c_proj.weight") else v) for k, v in f(m, vocab).items()})  # a transpose forgotten
    with pytest.raises(DataError, match="does NOT reproduce.*nothing was written"):
        export.main([f"--model={tmp_path}", f"--out={tmp_path / 'hf'}"])
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]  # neither hf nor hf.partial


@needs_tokenizer
def test_small_vocabulary_and_bad_which_are_one_line_errors(tmp_path):
    model = tiny(vocab_size=97)
    torch.save(checkpoint(model), tmp_path / "best.pt")
    with pytest.raises(DataError, match="vocab_size 97"):
        export.main([f"--model={tmp_path}"])
    with pytest.raises(ConfigError, match="which"):
        export.main([f"--model={tmp_path}", "--which=first"])


def test_transformers_and_the_architecture_are_checked_before_the_tokenizer(tmp_path, monkeypatch):
    """A user with no tokenizer file and an unexportable model (or no transformers) hears about the model first:
    no tokenizer could make it exportable."""
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(tmp_path / "missing.tiktoken"))
    torch.save(checkpoint(tiny(mlp="relu2")), tmp_path / "best.pt")
    with pytest.raises(DataError, match="mlp='relu2'"):
        export.main([f"--model={tmp_path}"])
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers fails
    with pytest.raises(DataError, match="needs the transformers package"):
        export.main([f"--model={tmp_path}"])
    monkeypatch.undo()
    torch.save(checkpoint(tiny()), tmp_path / "best.pt")  # exportable: now the tokenizer is what is missing
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(tmp_path / "missing.tiktoken"))
    with pytest.raises(DataError, match="missing.tiktoken"):
        export.main([f"--model={tmp_path}"])
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]


@needs_tokenizer
def test_every_file_of_the_export_gets_the_umask_mode(tmp_path):
    """safetensors writes its file 0600; the export's files are all what the user's umask gives (0644 here)."""
    torch.save(checkpoint(tiny()), tmp_path / "best.pt")
    umask = os.umask(0o022)
    try:
        export.main([f"--model={tmp_path}", "--check=False"])
    finally:
        os.umask(umask)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {"0o644"} and "model.safetensors" in modes, modes


# --- faults: a kill at an exact moment, a full disk (injected into the real script through conftest.run_with_fault)

KILLS = {  # the model half written (config.json there, no safetensors) / the tokenizer half written
    "safetensors": """
import os, signal, transformers.modeling_utils as m
m.safe_save_file = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
""",
    "tokenizer": """
import os, signal
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
def killed(self, out, *args, **kwargs):
    open(os.path.join(out, "tokenizer_config.json"), "w").write("{}")
    os.kill(os.getpid(), signal.SIGKILL)
PreTrainedTokenizerBase.save_pretrained = killed
"""}


def snapshot(directory):
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("point,earlier_export", [("safetensors", False), ("tokenizer", True)])
@needs_tokenizer
def test_a_killed_export_never_looks_valid_and_the_rerun_works(tmp_path, point, earlier_export):
    """Killed while writing, an export leaves no directory under --out's name (or the earlier export there,
    untouched); the rerun, with nothing deleted by hand, writes it."""
    torch.save(checkpoint(tiny()), tmp_path / "best.pt")
    out = tmp_path / "hf"
    if earlier_export:
        run_script("export.py", f"--model={tmp_path}", "--check=False")
        before = snapshot(out)
    killed = run_with_fault(KILLS[point], "export.py", f"--model={tmp_path}")
    assert killed.returncode == -9, killed.stderr
    assert snapshot(out) == before if earlier_export else not out.exists()
    run_script("export.py", f"--model={tmp_path}")
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "hf"]  # the killed run's partial directory is gone
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("Hello world")["input_ids"] == [15496, 995]


FULL_DISK = """
import errno, os, transformers.modeling_utils as m
def full(tensors, filename, metadata=None):
    open(filename, "wb").write(b"x" * 1000)  # a partial file, as a real write leaves
    raise {error}
m.safe_save_file = full
"""


@pytest.mark.slow
@pytest.mark.parametrize("error", ["OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))",
                                   "__import__('safetensors').SafetensorError("
                                   "'Error while serializing: I/O error: No space left on device (os error 28)')"])
@needs_tokenizer
def test_a_full_disk_is_one_line_naming_the_export_and_leaves_nothing(tmp_path, error):
    """The OSError itself, or safetensors' own error for it (what a real full disk raises): one line naming the
    export, its file and the space it needs; the partial files removed."""
    torch.save(checkpoint(tiny()), tmp_path / "best.pt")
    result = run_with_fault(FULL_DISK.format(error=error), "export.py", f"--model={tmp_path}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no space left" in result.stderr and f"{tmp_path / 'hf'}" in result.stderr
    assert "model.safetensors" in result.stderr and " MB" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]
