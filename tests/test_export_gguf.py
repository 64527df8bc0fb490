"""export.py --gguf: the file read back with gguf's reader (every tensor, the metadata), the refusals, a kill, and
llama.cpp itself (llama-cpp-python) against our model on tiny trained models of each architecture."""
import os
import re

import numpy as np
import pytest
import torch
from conftest import needs_tokenizer, randomized_tiny_gpt, run_script, run_with_fault

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

import export
from smallgpt.chat import CHAT_TEMPLATE
from smallgpt.errors import ConfigError, DataError
from smallgpt.tokenizer import SPECIAL_TOKENS, get_tokenizer

MODERN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
ARCHITECTURES = {  # every weight randomised (conftest), biases and untied heads where llama.cpp has them
    "gpt2": dict(gelu_approximate="tanh", bias=True, tie_embeddings=False),
    "llama": dict(**MODERN, bias=True, tie_embeddings=False, rope_theta=500.0, mlp_hidden=64, n_kv_head=1),
    "qwen3": dict(**MODERN, qk_norm=True),
}


def checkpoint(model):
    return {"model": model.state_dict(), "model_args": model.config.__dict__}


def read_back(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def undo_layout(name, data, arch, n_head, n_kv_head):
    """The documented layout transform, undone: GPT-2's matrices back to HF's Conv1D (in, out); Llama's q/k rows
    from llama.cpp's adjacent RoPE pairs back to rotate-half."""
    if arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")):
        return data.T
    if arch == "llama" and re.search(r"attn_[qk]\.", name):
        n_head = n_head if re.search(r"attn_q\.", name) else n_kv_head
        return data.reshape(n_head, data.shape[0] // n_head // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    return data


@pytest.mark.parametrize("arch", [pytest.param("gpt2", marks=pytest.mark.slow), "llama",  # ~4 s each: one in the fast lane
                                  pytest.param("qwen3", marks=pytest.mark.slow)])
@needs_tokenizer
def test_every_tensor_and_the_metadata_read_back(tmp_path, arch):
    """f32: each GGUF tensor is the export's HF tensor (export.gpt2_state_dict / llama_state_dict) after the layout
    transform, under gguf's own name for it; the metadata holds what llama.cpp reads."""
    model = randomized_tiny_gpt(**ARCHITECTURES[arch]).merge_multipliers(untie=True)
    export.write_gguf(model, str(tmp_path / "m.gguf"), arch, "f32", get_tokenizer(), "tiny")
    fields, tensors = read_back(str(tmp_path / "m.gguf"))
    vocab = 50267  # GPT-2's tokens and the 10 reserved chat tokens: the model has rows for them all (50304)
    hf = export.gpt2_state_dict(model, vocab) if arch == "gpt2" else export.llama_state_dict(model, vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    assert len(tensors) == len(hf)
    for key, value in hf.items():
        t = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(undo_layout(t.name, t.data, arch, 2, model.config.kv_heads), value.numpy(), err_msg=key)
    cfg = model.config
    assert fields["general.architecture"] == arch and fields[f"{arch}.context_length"] == cfg.block_size
    assert (fields[f"{arch}.embedding_length"], fields[f"{arch}.block_count"]) == (cfg.n_embd, cfg.n_layer)
    assert fields[f"{arch}.feed_forward_length"] == (cfg.mlp_hidden or 4 * cfg.n_embd)
    assert (fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]) == (2, cfg.kv_heads)
    if arch == "gpt2":
        assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    else:
        assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
        assert fields[f"{arch}.rope.freq_base"] == cfg.rope_theta and fields[f"{arch}.rope.dimension_count"] == 16
    names, merges = export.gpt2_vocab_and_merges(get_tokenizer())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == sorted(names, key=names.get) + list(SPECIAL_TOKENS[1:])
    assert fields["tokenizer.ggml.merges"] == merges and len(fields["tokenizer.ggml.token_type"]) == vocab
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 50256  # <|endoftext|>
    control = [i for i, t in enumerate(fields["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL]
    assert control == list(range(50256, 50267))  # <|endoftext|> and the chat tokens, never text
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE


@pytest.mark.slow
def test_the_types_round_the_matrices_only(tmp_path):
    """f16, bf16, q8_0: the matrices are the float32 ones rounded (q8_0: to 1/127 of each block of 32's largest
    value); vectors and the position table stay float32."""
    model = randomized_tiny_gpt(gelu_approximate="tanh").merge_multipliers(untie=True)
    exact = export.gguf_tensors(model, "gpt2", 50267)
    for gguf_type in ("f16", "bf16", "q8_0"):
        export.write_gguf(model, str(tmp_path / f"{gguf_type}.gguf"), "gpt2", gguf_type, get_tokenizer(), "tiny")
        _, tensors = read_back(str(tmp_path / f"{gguf_type}.gguf"))
        for name, value in exact.items():
            t = tensors[name]
            if value.dim() == 1 or name.startswith("position_embd"):
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                continue
            assert t.tensor_type == gguf.GGMLQuantizationType[gguf_type.upper()]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(value.shape)
            if gguf_type == "q8_0":
                scale = value.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
                assert ((got.reshape(-1, 32) - value.reshape(-1, 32)).abs() <= scale * 0.57).all(), name  # d in float16
            else:
                assert torch.equal(got, value.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[gguf_type])).float())


@pytest.mark.parametrize("overrides,args,message", [
    (dict(), [], "gelu_approximate='none': llama.cpp's GPT-2 computes the tanh GELU only"),
    (dict(**MODERN, logit_softcap=15.0), [], "logit_softcap=15.0"),
    (dict(**MODERN), ["--gguf_type=q4_0"], "gguf_type must be one of f32, f16, bf16, q8_0, not 'q4_0'"),
    (dict(**MODERN), ["--out=model.bin"], "is not a .gguf file name"),
])
def test_what_llama_cpp_cannot_compute_is_refused_in_one_line(tmp_path, overrides, args, message):
    refuse(tmp_path, checkpoint(randomized_tiny_gpt(**overrides)), args, message)


def test_a_trained_tokenizer_is_refused_in_one_line(tmp_path):
    """llama.cpp has no pre-tokenizer that splits as prepare.py's BPE (GPT-4's split): no GGUF, one line (the check
    reads the record's name; the HF export carries such a tokenizer, test_tokenizer)."""
    record = {"name": "bpe-1024", "sha256": "0" * 64, "json": "{}"}
    refuse(tmp_path, {**checkpoint(randomized_tiny_gpt(**MODERN, vocab_size=1024)), "tokenizer": record}, [],
           "no GGUF for a model of a trained tokenizer (bpe-1024 (sha256 000000000000...)): llama.cpp has no "
           "pre-tokenizer that splits text as it does")


def refuse(tmp_path, ckpt, args, message):
    torch.save(ckpt, tmp_path / "best.pt")
    with pytest.raises((ConfigError, DataError), match=re.escape(message)) as e:
        export.main([f"--model={tmp_path}", "--gguf", *args])
    assert "\n" not in str(e.value) and sorted(os.listdir(tmp_path)) == ["best.pt"]


@pytest.mark.slow
def test_a_killed_gguf_export_leaves_nothing_and_the_rerun_works(tmp_path):
    torch.save(checkpoint(randomized_tiny_gpt(**MODERN)), tmp_path / "best.pt")
    kill = ("import os, signal, gguf\n"
            "gguf.GGUFWriter.write_tensors_to_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)")
    assert run_with_fault(kill, "export.py", f"--model={tmp_path}", "--gguf").returncode == -9
    assert sorted(os.listdir(tmp_path)) == ["best.pt", f"{tmp_path.name}-f16.gguf.partial"]  # never the real name
    run_script("export.py", f"--model={tmp_path}", "--gguf", "--check=False")
    assert sorted(os.listdir(tmp_path)) == ["best.pt", f"{tmp_path.name}-f16.gguf"]


# --- llama.cpp itself

FAST = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=64", "--batch_size=8", "--gradient_accumulation_steps=1",
        "--eval_iters=2", "--condensation_seqs=0", "--log_interval=50", "--max_iters=100", "--lr_decay_iters=100",
        "--eval_interval=100", "--device=cpu", "--compile=False"]
TRAINED = {"gpt2": ["--gelu_approximate=tanh"], "llama tied": ["--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu"],
           "llama untied": ["--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu", "--tie_embeddings=False"],
           "qwen3": ["--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu", "--qk_norm=True"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, token_dir):
    """Tiny models of each architecture trained for 100 steps (2 x 64, context 64) by train.py, as measured in docs."""
    pytest.importorskip("llama_cpp")
    runs = {}
    for name, args in TRAINED.items():
        runs[name] = tmp_path_factory.mktemp(name.replace(" ", "-"))
        run_script("train.py", "config/train_tiny.py", *FAST, *args, f"--data_dir={token_dir}", f"--out_dir={runs[name]}")
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_llama_cpp_reproduces_trained_models(trained, name, tmp_path, capsys):
    """Every type through export.py's check: llama.cpp's logits on fixed texts within the type's tolerance of
    ours, and the same greedy continuation. The measured differences are printed (docs/export-eval.md)."""
    measured = {}
    for gguf_type in export.GGUF_TYPES:
        export.main([f"--model={trained[name]}", "--gguf", f"--gguf_type={gguf_type}", f"--out={tmp_path / 'm.gguf'}"])
        line = capsys.readouterr().out.splitlines()[0]
        assert line.startswith("check: llama.cpp reproduces"), line
        measured[gguf_type] = float(re.search(r"max difference ([\d.e+-]+)", line)[1])
    with capsys.disabled():
        print(f"\n{name}: " + ", ".join(f"{t} {d:.1e}" for t, d in measured.items()))
    assert measured["f32"] < measured["q8_0"]


@pytest.mark.slow
def test_the_llama_cpp_check_fails_on_a_wrong_layout(tmp_path, monkeypatch):
    """The check can fail: Llama's q/k rows left in rotate-half order (as for Qwen3) change the logits."""
    pytest.importorskip("llama_cpp")
    torch.save(checkpoint(randomized_tiny_gpt(**MODERN)), tmp_path / "best.pt")
    monkeypatch.setattr(export, "rope_interleaved", lambda w, n_head: w)
    with pytest.raises(DataError, match="llama.cpp does NOT reproduce .*nothing was written"):
        export.main([f"--model={tmp_path}", "--gguf", "--gguf_type=f32"])
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]


@pytest.mark.slow
def test_llama_cpp_reproduces_grouped_query_attention(tmp_path, capsys):
    """n_kv_head < n_head: llama.cpp's key/value head count and the key rows interleaved per key/value head."""
    pytest.importorskip("llama_cpp")
    torch.save(checkpoint(randomized_tiny_gpt(**MODERN, n_head=4, n_kv_head=2)), tmp_path / "best.pt")
    export.main([f"--model={tmp_path}", "--gguf", "--gguf_type=f32"])  # a random model: f32
    assert capsys.readouterr().out.startswith("check: llama.cpp reproduces")


@pytest.mark.slow
def test_gguf_entry_point(tmp_path):
    torch.save(checkpoint(randomized_tiny_gpt(**MODERN, qk_norm=True)), tmp_path / "best.pt")
    result = run_script("export.py", f"--model={tmp_path}", "--gguf", "--gguf_type=f32")  # a random model: f32
    out = tmp_path / f"{tmp_path.name}-f32.gguf"
    umask = os.umask(0)
    os.umask(umask)
    assert f"to {out} (context_length=16" in result.stdout and out.stat().st_mode & 0o777 == 0o666 & ~umask
    try:
        import llama_cpp  # noqa: F401
        assert "check: llama.cpp reproduces" in result.stdout
    except ImportError:
        assert "check: not run: llama-cpp-python is not installed" in result.stdout
