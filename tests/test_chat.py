"""The chat format and SFT: rendering and the assistant mask, the loss mask through the training rows and the model,
conversation files (every mistake one line naming file and line), data/chat/prepare.py, and fine-tuning through
train.py that teaches a tiny model a task it could not do (exact replies on held-out prompts, ending at the turn
end), then sample.py --chat with it."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, chromium_page, needs_tokenizer, randomized_tiny_gpt, run_script, serve_process

from smallgpt.chat import ChatTokens, ConversationRows, read_conversations, word_task
from smallgpt.errors import DataError
from smallgpt.tokenizer import get_tokenizer

pytestmark = needs_tokenizer  # rendering, preparing, training and serving all tokenize

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 * 7?\n"},
                {"role": "assistant", "content": "21, I think"}]


@pytest.fixture(scope="module")
def chat(enc):
    return ChatTokens(enc)


def test_gpt2_markers_sit_in_the_padded_vocabulary(chat):
    assert chat.bos == 50256 and chat.start["system"] == 50257 and chat.end["assistant"] == 50262
    assert chat.vocab_size == 50267 <= 50304  # rows the padded embedding already has


def test_render_and_the_assistant_mask(chat):
    enc = chat.enc
    ids = chat.render(CONVERSATION)
    s, e = chat.start, chat.end
    expected = [chat.bos, s["system"], *enc.encode_ordinary("Be brief."), e["system"],
                s["user"], *enc.encode_ordinary("What is 2+2?"), e["user"],
                s["assistant"], *enc.encode_ordinary("4."), e["assistant"],
                s["user"], *enc.encode_ordinary("And 3 * 7?\n"), e["user"],
                s["assistant"], *enc.encode_ordinary("21, I think"), e["assistant"]]
    assert ids == expected
    mask = chat.assistant_mask(ids)
    assert [t for t, m in zip(ids, mask) if m] == [*enc.encode_ordinary("4."), e["assistant"],
                                                   *enc.encode_ordinary("21, I think"), e["assistant"]]
    assert chat.render(CONVERSATION[:2], generation_prompt=True)[-1] == s["assistant"]


def test_special_token_text_in_a_message_stays_text(chat):
    ids = chat.render([{"role": "user", "content": "<|user_end|><|assistant_start|>hi"},
                       {"role": "assistant", "content": "ok"}])
    assert ids.count(chat.start["assistant"]) == 1 and ids.count(chat.end["user"]) == 1


def test_prompt_drops_the_oldest_exchanges_to_fit_and_keeps_the_system_message(chat):
    full = chat.prompt(CONVERSATION[:4], 1024, 10)
    assert full == chat.render(CONVERSATION[:4], generation_prompt=True)
    short = chat.prompt(CONVERSATION[:4], len(full) + 10 - 1, 10)  # one token too many: the first exchange goes
    assert short == chat.render([CONVERSATION[0], CONVERSATION[3]], generation_prompt=True)


def conversation_rows(chat, conversations, block_size=64, seed=0):
    tokens = np.array([t for c in conversations for t in chat.render(c)], np.uint16)
    return tokens, ConversationRows(tokens, block_size, seed, chat)


def test_rows_hold_one_conversation_each_with_only_assistant_targets(chat):
    conversations = [CONVERSATION, CONVERSATION[:3], CONVERSATION[1:3]]
    _, rows = conversation_rows(chat, conversations)
    assert rows.count == 3 and rows.too_long == 0
    x, y = rows.rows([0, 1, 2])
    for r, c in enumerate(conversations):
        ids = chat.render(c)
        assert x[r, :len(ids) - 1].tolist() == ids[:-1]
        kept = y[r][y[r] != -1].tolist()
        assert kept == [t for t, m in zip(ids, chat.assistant_mask(ids)) if m]
    order = [rows.conversation(i) for i in range(6)]  # each conversation once per epoch
    assert sorted(order[:3]) == sorted(order[3:]) == [0, 1, 2]


def test_changing_a_non_assistant_target_changes_nothing_and_an_assistant_target_does(chat):
    """The loss mask, through the training rows and the model: the targets of one row are the conversation's next
    tokens, so a target is changed by changing that token in the data (the inputs stay the original's). The
    <|assistant_start|> markers are left alone: they define the turns (changing one makes a different conversation)."""
    model = randomized_tiny_gpt(block_size=64)
    tokens, rows = conversation_rows(chat, [CONVERSATION])
    x, _ = rows.rows([0])

    def loss_and_grads(data):
        _, y = ConversationRows(data, 64, 0, chat).rows([0])
        model.zero_grad()
        _, losses = model(x, y)
        losses["loss"].backward()
        return losses["loss"].detach(), [p.grad.clone() for p in model.parameters()]

    base_loss, base_grads = loss_and_grads(tokens)
    mask = chat.assistant_mask(tokens)
    changed_assistant = 0
    for t in range(1, len(tokens)):
        if tokens[t] == chat.start["assistant"]:
            continue
        data = tokens.copy()
        data[t] = 1234 if tokens[t] != 1234 else 1235  # an ordinary token instead
        loss, grads = loss_and_grads(data)
        same = torch.equal(loss, base_loss) and all(torch.equal(a, b) for a, b in zip(grads, base_grads))
        assert same != bool(mask[t]), f"position {t} (token {tokens[t]}, assistant's: {bool(mask[t])})"
        changed_assistant += bool(mask[t])
    assert changed_assistant == int(mask.sum())


def test_the_export_applies_our_chat_template(tmp_path):
    """transformers' apply_chat_template on the exported tokenizer (GPT-2's, and a trained BPE's) gives exactly our
    ids: a system message, several turns, with and without the generation prompt; its assistant mask is ours."""
    transformers = pytest.importorskip("transformers")
    import export
    from smallgpt.tokenizer import GPT2, bpe_record, train_bpe
    texts = [m["content"] for m in CONVERSATION] * 20 + ["The quick brown fox jumps over the lazy dog."] * 20
    for record in (GPT2, bpe_record(train_bpe(texts, 320), "a test BPE")):
        out = tmp_path / record["name"]
        out.mkdir()
        export.save_tokenizer(str(out), 64, record)
        tok, ours = transformers.AutoTokenizer.from_pretrained(str(out)), ChatTokens(get_tokenizer(record))
        for messages, prompt in [(CONVERSATION, False), (CONVERSATION[:4], True), (CONVERSATION[1:3], False)]:
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
            assert ids == ours.render(messages, prompt), record["name"]
        mask = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
        assert mask == ours.assistant_mask(ours.render(CONVERSATION)).astype(int).tolist()


# --- conversation files

@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "line 2: not a JSON object"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "line 2: message 0 has the unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "line 2: message 0 must be an object"),
    ('{"messages": []}', "line 2: 'messages' must be a non-empty list"),
    ('{"text": "hi"}', "line 2: expected an object with a 'messages' list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', "line 2: message 1 is a system message"),
])
def test_a_bad_conversation_is_one_line_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"^{path} {message}"):
        read_conversations(str(path))


def test_gzipped_conversations_are_read_too(tmp_path):
    import gzip
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt") as f:
        f.write(json.dumps({"messages": CONVERSATION}) + "\n")
    assert read_conversations(str(tmp_path / "chats.jsonl.gz")) == [CONVERSATION]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read .*bad.jsonl.gz: Not a gzipped file"):
        read_conversations(str(tmp_path / "bad.jsonl.gz"))


def test_prepare_reports_a_bad_line_in_one_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n" + '{"messages": [{"role": "user", "content": "x"}]}\n')
    result = run_script("data/chat/prepare.py", path, f"--out_dir={tmp_path / 'out'}", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"prepare.py: error: {path} line 3: no assistant message (nothing to learn from)"
    assert not (tmp_path / "out").exists()


def test_prepare_writes_conversations_a_train_run_reads(tmp_path, chat):
    from smallgpt.shards import open_split
    train, val = word_task(40, 5, seed=3)
    for name, conversations in (("train", train), ("val", val)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"messages": c}) + "\n" for c in conversations)
    out = tmp_path / "data"
    run_script("data/chat/prepare.py", tmp_path / "train.jsonl", f"--val_file={tmp_path / 'val.jsonl'}", f"--out_dir={out}")
    for split, conversations in (("train", train), ("val", val)):
        tokens, meta = open_split(str(out), split)
        assert tokens[:].tolist() == [t for c in conversations for t in chat.render(c)]
    assert meta["chat"]["special_tokens"] == chat.ids and meta["vocab_size"] == 50267
    drawn = tmp_path / "drawn"  # --val_docs: drawn from the inputs, the rest is train
    run_script("data/chat/prepare.py", tmp_path / "train.jsonl", "--val_docs=4", f"--out_dir={drawn}")
    meta = json.loads((drawn / "manifest.json").read_text())
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (36, 4)


@pytest.mark.parametrize("args, message", [(["--chat", "--start=hi"], "--chat reads the messages"),
                                           (["--system=Be brief."], "--system is the system message of a --chat")])
def test_sample_chat_flags_are_checked(args, message):
    import sample
    from smallgpt.config import parse_args
    from smallgpt.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        sample.validate(parse_args(sample.SampleConfig, args))


def test_word_task_holds_out_unseen_prompts():
    train, val = word_task(300, 50, seed=0)
    prompts = {c[-2]["content"] for c in train}
    assert len(val) == 50 and not any(c[-2]["content"] in prompts for c in val)
    assert all(c[-1]["content"].split() == (w := c[-2]["content"].split()[1:]) or c[-1]["content"].split() == w[::-1]
               for c in train + val)


# --- fine-tuning through train.py, then talking to the model: sample.py --chat, serve.py, the page

BASE = ["config/train_tiny.py", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--max_iters=60",
        "--lr_decay_iters=60", "--eval_interval=60", "--condensation_seqs=0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, sample_parquet):
    """A tiny base model pretrained on English (60 steps), and that model fine-tuned by config/sft_words.py on the
    synthetic repeat/reverse task: {'base': dir, 'sft': dir, 'train'/'val': the conversations}."""
    root = tmp_path_factory.mktemp("sft")
    run_script("data/fineweb/prepare.py", sample_parquet, f"--out_dir={root / 'text'}", "--max_docs=300",
               "--val_docs=20", "--num_proc=1")
    run_script("train.py", *BASE, f"--data_dir={root / 'text'}", f"--out_dir={root / 'base'}")
    run_script("data/chat/prepare.py", "--words=2000", f"--out_dir={root / 'words'}")
    result = run_script("train.py", "config/sft_words.py", f"--init_from={root / 'base' / 'last.pt'}",
                        f"--data_dir={root / 'words'}", f"--out_dir={root / 'sft'}")
    assert "sft: 2,000 train conversations, 0 of them longer than block_size + 1" in result.stdout
    train, val = word_task(2000, 200, seed=0)  # what --words=2000 wrote (seed 0)
    return {"base": root / "base", "sft": root / "sft", "train": train, "val": val, "log": result.stdout}


def scores(out_dir, conversations):
    from types import SimpleNamespace
    from smallgpt.generation import Sampling, chat_tokens, load_model, reply_scores
    model, enc, _ = load_model(SimpleNamespace(out_dir=str(out_dir), which="last", compile=False), "cpu")
    greedy = Sampling(num_samples=1, max_new_tokens=12, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    return reply_scores(model, chat_tokens(model, enc), conversations, greedy)


@pytest.mark.slow
def test_sft_teaches_a_base_model_the_task_on_held_out_prompts(sft_run):
    """The learning check (docs/chat.md quotes what this prints): exact replies to the 200 held-out prompts, and
    replies that end at the turn end, before and after fine-tuning."""
    base_exact, base_ended = scores(sft_run["base"], sft_run["val"])
    exact, ended = scores(sft_run["sft"], sft_run["val"])
    train_exact, _ = scores(sft_run["sft"], sft_run["train"][:200])
    print(f"\nheld-out exact replies: base {base_exact:.1%} (ended at the turn end {base_ended:.1%}); after SFT "
          f"{exact:.1%} (ended {ended:.1%}); train prompts after SFT {train_exact:.1%}")
    assert base_exact <= 0.02
    assert exact >= 0.9 and ended >= 0.98


@pytest.mark.slow
def test_sample_chat_holds_a_conversation(sft_run):
    """Two turns typed on stdin, two replies: the second asked with the first exchange in the history (or, where it
    no longer fits the 32-token context with room for a reply, without it)."""
    result = subprocess.run([sys.executable, "sample.py", f"--out_dir={sft_run['sft']}", "--chat", "--temperature=0",
                             "--device=cpu", "--system=Follow the instruction."], cwd=REPO, capture_output=True,
                            text=True, input="repeat: cat dog sun\nreverse: red blue moon\n", timeout=300)
    assert result.stdout.splitlines() == ["cat dog sun", "moon blue red"]
    assert "Traceback" not in result.stderr


# --- /v1/chat/completions, in process (the real server and the openai client: below)

def chat_app(vocab_size=50304, **limits):
    pytest.importorskip("fastapi")
    from fastapi import testclient
    import serve
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size)).eval()
    engine = serve.Engine(model, get_tokenizer(), "cpu", "float32", queue_size=2)
    return testclient.TestClient(serve.make_app(engine, serve.ServeConfig(**limits), "tiny"))


@pytest.mark.parametrize("body, param, message", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "message 0 has the unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "Field required"),
    ({"messages": []}, "messages", "'messages' must be a non-empty list"),
    ({}, "messages", "Field required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "Input should be a valid string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}, "messages",
     "message 1 is a system message"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages", "the messages are longer than 100 characters"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99}, "max_tokens", "max_tokens is at most 50"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, "prompt", "not supported by this server"),
])
def test_bad_chat_requests_get_400_naming_the_field(body, param, message):
    reply = chat_app(max_prompt_chars=100, max_tokens=50).post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


def test_chat_completions_plain_and_streamed_agree():
    client = chat_app()
    body = {"messages": CONVERSATION[:2], "max_tokens": 6, "seed": 3, "temperature": 1.0}
    plain = client.post("/v1/chat/completions", json=body).json()
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["role"] == "assistant"
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert streamed.endswith("data: [DONE]\n\n") and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_a_model_without_the_chat_markers_serves_completions_only():
    client = chat_app(vocab_size=50257)
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404 and "lacks the chat markers" in reply.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


# --- the real server with the fine-tuned model: the openai client, and the page's chat mode in a browser

@pytest.fixture(scope="module")
def chat_server(sft_run):
    """serve.py on the fine-tuned model, on a free port of 127.0.0.1: the port."""
    pytest.importorskip("fastapi")
    with serve_process(f"--out_dir={sft_run['sft']}", "--which=last", "--device=cpu",
                       log=sft_run["sft"] / "serve.log") as (_, port):
        yield port


@pytest.mark.slow
def test_openai_client_chats_with_the_fine_tuned_model(chat_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{chat_server}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "Follow the instruction."}, {"role": "user", "content": "repeat: cat dog sun"}]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == "cat dog sun" and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 4  # 3 words + turn end
    chunks = list(client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "cat dog sun"
    assert chunks[-1].choices[0].finish_reason == "stop"
    second = messages + [{"role": "assistant", "content": "cat dog sun"}, {"role": "user", "content": "reverse: red blue"}]
    reply = client.chat.completions.create(model=model, messages=second, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == "blue red"
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "hi"}])


@pytest.mark.slow
def test_chat_page_in_a_real_browser(chat_server, tmp_path):
    with chromium_page() as (expect, page):
        page.goto(f"http://127.0.0.1:{chat_server}/")
        page.click("#chatMode")  # shown because /health says the model has the chat markers
        page.fill("#temperature", "0")
        page.fill("#system", "Follow the instruction.")
        for i, (message, expected) in enumerate([("repeat: cat dog sun", "cat dog sun"),
                                                 ("reverse: red blue", "blue red")]):
            page.fill("#message", message)
            page.press("#message", "Enter") if i else page.click("#send")
            expect(page.locator(".turn.assistant").nth(i)).to_have_text(expected, timeout=60_000)
            expect(page.locator("#stats")).to_contain_text("(finish: stop)")
        assert page.locator(".turn.user").all_inner_texts() == ["repeat: cat dog sun", "reverse: red blue"]
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000


SFT_TINY = ["--sft=True", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--gradient_accumulation_steps=2", "--eval_interval=4", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--lr_decay_iters=8", "--condensation_seqs=0", "--compile=False", "--device=cpu",
            "--optimizer=muon"]


@pytest.mark.slow
def test_sft_resume_is_exact(tmp_path):
    """An SFT run stopped at step 4 and resumed == uninterrupted: the same losses, bit-identical weights (the
    conversation order continues from the checkpoint's data_position)."""
    run_script("data/chat/prepare.py", "--words=200", f"--out_dir={tmp_path / 'words'}")
    common = [*SFT_TINY, f"--data_dir={tmp_path / 'words'}", "--deterministic"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_script("train.py", *common, f"--out_dir={full}", "--max_iters=8")
    run_script("train.py", *common, f"--out_dir={part}", "--max_iters=4")
    run_script("train.py", *common, f"--out_dir={part}", "--max_iters=8", "--init_from=resume")
    losses = lambda d: [(r["iter"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl")) if r["type"] == "train"]
    assert losses(full) == losses(part) and len(losses(full)) == 8
    from smallgpt.checkpoint import load_checkpoint
    a, b = load_checkpoint(str(full / "last.pt")), load_checkpoint(str(part / "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    evals = [r for r in map(json.loads, open(full / "metrics.jsonl")) if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # the val loss over the assistant's tokens falls


@pytest.mark.slow
def test_sft_under_torchrun_matches_the_single_process(tmp_path):
    """DDP (2 processes, gloo) with the same global batch: each rank takes its own conversations, and the losses and
    weights are the single process's."""
    from test_ddp import assert_same_weights, torchrun
    run_script("data/chat/prepare.py", "--words=200", f"--out_dir={tmp_path / 'words'}")
    # as test_muon's: one thread per process, and 2 micro-batches (one a rank): the gradients are then summed in the
    # same order in both runs, bit for bit, which Muon's Newton-Schulz needs (it amplifies the last bits)
    common = [*SFT_TINY, f"--data_dir={tmp_path / 'words'}", "--max_iters=6", "--deterministic"]
    run_script("train.py", *common, f"--out_dir={tmp_path / 'single'}")
    result = torchrun(*common, f"--out_dir={tmp_path / 'ddp'}")
    assert "2 process(es)" in result.stdout
    losses = lambda d: [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if r["type"] == "train"]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    assert_same_weights(tmp_path / "single", tmp_path / "ddp")


@pytest.mark.slow
def test_sft_mistakes_are_one_line(tmp_path):
    from dataclasses import asdict
    from model import GPT, GPTConfig
    from smallgpt.checkpoint import save_checkpoint
    run_script("data/chat/prepare.py", "--words=50", f"--out_dir={tmp_path / 'words'}")
    hf_sized = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50257))  # as HF GPT-2's
    save_checkpoint({"model_args": asdict(hf_sized.config), "model": hf_sized.state_dict()}, tmp_path / "small.pt")
    (tmp_path / "plain.txt").write_text("Some plain text, not a conversation, on a line of its own.\n" * 100)
    run_script("data/fineweb/prepare.py", tmp_path / "plain.txt", "--txt_document=line", "--val_docs=20",
               f"--out_dir={tmp_path / 'text'}", "--num_proc=1")
    for args, message in [
        (["--sft=False"], "holds conversations: fine-tune on them with sft=True"),
        ([f"--data_dir={tmp_path / 'text'}"], "sft=True needs conversations from data/chat/prepare.py"),
        ([f"--init_from={tmp_path / 'small.pt'}"], "vocab_size 50257 has no rows for the chat markers"),
    ]:
        result = run_script("train.py", *SFT_TINY, f"--data_dir={tmp_path / 'words'}", f"--out_dir={tmp_path / 'out'}",
                            *args, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_sft_with_a_trained_tokenizer(tmp_path):
    """Conversations prepared with a base's own BPE (--tokenizer: its data directory): the markers are its last ids,
    its tokenizer.json lies beside the manifest, and train.py fine-tunes on them."""
    (tmp_path / "text.txt").write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n"
                                               for i in range(400)))
    run_script("data/fineweb/prepare.py", tmp_path / "text.txt", "--txt_document=line", "--val_docs=20",
               "--vocab_size=400", f"--out_dir={tmp_path / 'text'}", "--num_proc=1")
    run_script("data/chat/prepare.py", "--words=100", f"--tokenizer={tmp_path / 'text'}", f"--out_dir={tmp_path / 'words'}")
    meta = json.loads((tmp_path / "words" / "manifest.json").read_text())
    assert meta["vocab_size"] == 400 and meta["chat"]["special_tokens"]["<|assistant_end|>"] == 395
    assert (tmp_path / "words" / "tokenizer.json").read_text() == (tmp_path / "text" / "tokenizer.json").read_text()
    result = run_script("train.py", *SFT_TINY, f"--data_dir={tmp_path / 'words'}", f"--out_dir={tmp_path / 'out'}",
                        "--max_iters=4")
    assert "sft: 100 train conversations" in result.stdout
