"""export.py on the modern block: LlamaForCausalLM / Qwen3ForCausalLM with equal logits; one-line refusals for
switch combinations that no stock transformers class computes."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import export
from conftest import needs_tokenizer, randomized_tiny_gpt
from smallgpt.errors import DataError

V, EOT = 50267, 50256  # GPT-2's tokens and the reserved chat tokens (the padded ids above are cut); <|endoftext|>
MODERN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")


tiny = randomized_tiny_gpt  # every weight randomised (norm gains, biases, multipliers too)


@pytest.mark.parametrize("overrides,cls", [
    (dict(), "LlamaForCausalLM"),
    (dict(tie_embeddings=False, rope_theta=500.0, mlp_hidden=48), "LlamaForCausalLM"),
    (dict(bias=True, multipliers="vector", tie_embeddings=False), "LlamaForCausalLM"),
    (dict(qk_norm=True), "Qwen3ForCausalLM"),
    (dict(qk_norm=True, tie_embeddings=False, multipliers="scalar"), "Qwen3ForCausalLM"),
    (dict(n_head=4, n_kv_head=2, multipliers="vector"), "LlamaForCausalLM"),  # grouped-query attention
    (dict(qk_norm=True, n_head=4, n_kv_head=1, tie_embeddings=False), "Qwen3ForCausalLM"),
])
@needs_tokenizer
def test_modern_block_exports_with_equal_logits(tmp_path, overrides, cls):
    model = tiny(**MODERN, **overrides)
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(idx)[0][..., :V]  # before merging the multipliers
        model.merge_multipliers(untie=True)  # as export.py does
        export.export(model, str(tmp_path))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        assert type(hf).__name__ == cls and hf.config.max_position_embeddings == 16
        assert hf.config.num_key_value_heads == model.config.kv_heads  # < num_attention_heads with n_kv_head
        assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == model.config.tie_embeddings
        torch.testing.assert_close(hf(idx).logits, expected, atol=1e-4, rtol=0)
        out = hf.generate(idx[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=EOT)
    ours = torch.cat(list(model.generate(idx[:1, :4], 6, temperature=0, vocab_limit=V)))
    assert out[0, 4:].tolist() == ours.tolist()


@pytest.mark.parametrize("overrides,switch", [
    (dict(logit_softcap=15.0), "logit_softcap=15.0"),
    (dict(mlp="relu2"), "mlp='relu2'"),
    (dict(norm="rmsnorm"), "norm='rmsnorm' with pos_emb='learned'"),
    (dict(qk_norm=True), "qk_norm=True with pos_emb='learned'"),
    (dict(mlp="swiglu"), "mlp='swiglu' with pos_emb='learned'"),
    (dict(pos_emb="rope", mlp="swiglu"), "norm='layernorm' with pos_emb='rope'"),
    (dict(pos_emb="rope", norm="rmsnorm"), "mlp='gelu' with pos_emb='rope'"),
    (dict(**MODERN, qk_norm=True, bias=True), "bias=True with qk_norm=True"),
    (dict(n_head=4, n_kv_head=2), "n_kv_head=2 with pos_emb='learned'"),
])
def test_combinations_without_an_hf_twin_fail_naming_the_switch(tmp_path, overrides, switch):
    model = tiny(**overrides)
    torch.save({"model": model.state_dict(), "model_args": model.config.__dict__}, tmp_path / "best.pt")
    with pytest.raises(DataError, match=switch.replace("(", r"\(")) as e:
        export.main([f"--model={tmp_path}", f"--out={tmp_path / 'hf'}"])
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()  # nothing written
