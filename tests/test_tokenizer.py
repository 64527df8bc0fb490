"""
Your own tokenizer (smallgpt/tokenizer.py, prepare.py --vocab_size / --tokenizer): a byte-level BPE trained with
`tokenizers`, used through tiktoken everywhere GPT-2's is. The units: round trips on hard Unicode, the exported
tokenizer.json encoding exactly as ours, the special tokens, damaged and foreign files as one line. Then through
the real scripts: prepare.py trains it on the train documents, train.py trains and resumes exactly, sample.py and
serve.py give the same text, eval.py and export.py use it, and every tokenizer mismatch is one line.
"""
import json
import random

import numpy as np
import pytest
import torch
from conftest import SAMPLE_PARQUET, needs_tokenizer, run_script

from smallgpt.config import TrainConfig, with_vocab_size
from smallgpt.errors import ConfigError, DataError
from smallgpt.generation import text_stream
from smallgpt.tokenizer import (GPT2, MAX_VOCAB, SPECIAL_TOKENS, SPLIT_PATTERN, bpe_record, check_same,
                                data_tokenizer, get_tokenizer, open_tokenizer, read_tokenizer, train_bpe)

VOCAB = 1024  # small: trains in about a second on 1,500 documents

# texts where byte-level tokenizers part: CJK, emoji sequences (ZWJ, flags, keycaps, skin tones), combining marks,
# control characters, mixed scripts and directions, whitespace of every kind, digit runs, specials written as text
HARD_TEXTS = ["Hello world", "日本語のテキストと中文文本，한국어 텍스트。", "👩🏽‍💻 🏳️‍🌈 🇯🇵 1️⃣ 👨‍👩‍👧‍👦 🧑‍🤝‍🧑",
              "e\u0301 a\u0308\u0323 Z\u0336\u0337 \u0915\u094d\u0937 \u1100\u1161\u11a8", "\x00\x01\x1b[31m\x7f\x85\u2028",
              "tabs\tand\r\nCRLF\u00a0NBSP \u3000ideographic\u200b\u200d", "   leading", "trailing   \n\n", " \n \n\n  x",
              "Привет, мир. Γειά σου. مرحبا بالعالم. שלום. नमस्ते", "1234567890 3.14159 1e10 ١٢٣ ⅻ", "I'm they've IT'S",
              "def f(x):\n    return x ** 2  # sq\n", "<|endoftext|> and <|user_start|> written as text", "ab" * 300,
              "\U0010ffff\U000e0001\ufeff\ufffd", ""]


def random_texts(n, seed=0):
    """Random strings over all of Unicode (controls included, lone surrogates excluded: they are not text)."""
    rng = random.Random(seed)
    planes = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    return ["".join(chr(rng.randint(*rng.choice(planes))) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def documents(sample_parquet):
    import pyarrow.parquet as pq
    return pq.read_table(sample_parquet, columns=["text"]).column(0).to_pylist()


@pytest.fixture(scope="module")
def trained(documents):
    """(record, encoding) of a BPE trained on the first 1,500 documents of the sample."""
    record = bpe_record(train_bpe(iter(documents[:1500]), VOCAB), "test")
    return record, get_tokenizer(record)


# -----------------------------------------------------------------------------
# The tokenizer itself

def test_round_trip_on_hard_unicode(trained, documents):
    """decode(encode(text)) == text, and the tokens' exact bytes join to the text's UTF-8, for hard texts, random
    strings over all of Unicode and unseen documents; CJK and emoji make tokens that are not UTF-8 on their own
    (a character split across tokens), and streaming them token by token still gives the text."""
    _, enc = trained
    split_characters = 0
    for text in HARD_TEXTS + random_texts(2000) + documents[-300:]:
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text
        pieces = [enc.decode_single_token_bytes(i) for i in ids]
        assert b"".join(pieces) == text.encode("utf-8")
        split_characters += sum(not is_utf8(p) for p in pieces)
        stream = text_stream(enc)  # what sample.py and serve.py print as tokens arrive
        assert "".join(stream([i]) for i in ids) + stream([], final=True) == text
    assert split_characters > 100  # the hard cases did split characters


def is_utf8(piece):
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_every_byte_is_a_token_and_the_specials_are_the_last_ids(trained):
    record, enc = trained
    assert enc.n_vocab == VOCAB and record["name"] == f"bpe-{VOCAB}"
    assert {enc.decode_single_token_bytes(i) for i in range(VOCAB - len(SPECIAL_TOKENS))} >= {bytes([b]) for b in range(256)}
    assert [enc.encode_single_token(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert enc.eot_token == VOCAB - len(SPECIAL_TOKENS)
    text = "a <|endoftext|> b <|assistant_end|>"  # in ordinary text, specials are text
    assert not set(enc.encode_ordinary(text)) & set(range(enc.eot_token, VOCAB))
    assert enc.encode(text, allowed_special="all")[-1] == VOCAB - 5  # the 7th of the 11


@needs_tokenizer
def test_gpt2_has_the_special_tokens_in_its_padded_vocabulary():
    """GPT-2's tokenizer encodes text exactly as tiktoken's own GPT-2; <|endoftext|> stays 50256 and the chat markers
    take 50257-50266, rows the 50,304-row embedding already has; they count no bytes in bits per byte."""
    import tiktoken
    from model import GPTConfig
    from smallgpt.evaluation import token_bytes
    tok = open_tokenizer()
    assert tok.record == GPT2 and list(tok.special) == list(SPECIAL_TOKENS)
    assert list(tok.special.values()) == list(range(50256, 50267)) and tok.enc.eot_token == 50256
    assert tok.enc.n_vocab == 50267 <= GPTConfig().vocab_size
    assert tok.enc.encode("hi<|user_start|>", allowed_special="all") == [5303, 50259]
    assert tok.enc.decode_single_token_bytes(50259) == b"<|user_start|>"
    table = token_bytes(tok.enc, 50304)
    assert table[50256:].sum() == 0 and table[:50256].min() >= 1
    try:  # tiktoken's own GPT-2 reads encoder.json and vocab.bpe: a plain clone offline has only gpt2.tiktoken
        reference = tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's own GPT-2 encoding cannot be loaded here ({type(e).__name__}): the comparison with it")
    for text in HARD_TEXTS:
        assert tok.enc.encode_ordinary(text) == reference.encode_ordinary(text)


def test_open_tokenizer_follows_the_data_directory_or_the_checkpoint(trained, tmp_path):
    """One function for every script: a checkpoint's tokenizer (GPT-2 for one that carries none), a data
    directory's, and both at once must agree (one line)."""
    record, enc = trained
    tok = open_tokenizer(ckpt={"tokenizer": record})
    assert tok.record == record and tok.enc is enc and tok.special == {s: VOCAB - 11 + i for i, s in enumerate(SPECIAL_TOKENS)}
    assert open_tokenizer(ckpt={}).record == GPT2  # nanoGPT's checkpoints and older ones
    meta = {"format": "gpt-tokens", "version": 1, "vocab_size": 50257, "eot_token": 50256,
            "splits": {s: {"tokens": 10, "bytes": 30} for s in ("train", "val")}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))  # a GPT-2 data directory
    assert open_tokenizer(str(tmp_path), {}).record == GPT2
    with pytest.raises(DataError, match=f"data_dir {tmp_path} uses the tokenizer gpt2, but x.pt uses bpe-{VOCAB}"):
        open_tokenizer(str(tmp_path), {"tokenizer": record, "path": "x.pt"})


def test_training_is_deterministic(trained, documents):
    assert bpe_record(train_bpe(iter(documents[:1500]), VOCAB), "again")["sha256"] == trained[0]["sha256"]


def test_tiktoken_encodes_like_tokenizers_on_every_character(trained):
    """tiktoken (our encoder) and `tokenizers` (the trainer, transformers) use different regex engines with their
    own Unicode tables: the same ids for every character of the BMP, every 61st beyond, in letters and digits
    around it. And the pitfall: GPT-4's `\\p{N}{1,3}+` would mean digit runs of any length in `tokenizers`; ours
    groups digits by three in both."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    record, enc = trained
    hf = Tokenizer.from_str(record["json"])
    hf.encode_special_tokens = True  # specials written in text are text, as encode_ordinary has it
    points = [*range(0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x110000, 61)]
    text = "".join(f" a{c}b{c}{c}1" for c in map(chr, points))
    pieces = [text[i:i + 50_000] for i in range(0, len(text), 50_000)]
    assert [enc.encode_ordinary(p) for p in pieces] == [e.ids for e in hf.encode_batch(pieces, add_special_tokens=False)]
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    assert [p for p, _ in split.pre_tokenize_str("x 1234567")] == ["x", " ", "123", "456", "7"]


def test_the_exported_tokenizer_encodes_exactly_as_ours(trained, documents, tmp_path):
    """export.py's tokenizer files, loaded offline by AutoTokenizer: the same ids as ours (text written like a
    special token stays text), the same decoded text, <|endoftext|> as BOS and EOS, the specials as special tokens."""
    transformers = pytest.importorskip("transformers")
    import export
    record, enc = trained
    export.save_tokenizer(str(tmp_path), 64, record)
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == record["json"]  # byte for byte
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in HARD_TEXTS + random_texts(500, seed=2) + documents[-500:]:
        ids = enc.encode_ordinary(text)
        assert tok(text, split_special_tokens=True)["input_ids"] == ids, text[:60]
        assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.bos_token_id == enc.eot_token and len(tok) == VOCAB and tok.model_max_length == 64
    assert tok("<|user_start|>")["input_ids"] == [enc.encode_single_token("<|user_start|>")]
    assert set(tok.all_special_tokens) == set(SPECIAL_TOKENS)


def test_a_damaged_or_foreign_tokenizer_is_one_line(trained, tmp_path):
    record, _ = trained
    spec = json.loads(record["json"])

    def variant(change):
        copy = json.loads(record["json"])
        change(copy)
        return json.dumps(copy)

    def more_specials(s):  # contiguous ids past uint16
        s["added_tokens"] += [dict(s["added_tokens"][0], id=VOCAB + i, content=f"<|extra_{i}|>")
                              for i in range(MAX_VOCAB - VOCAB + 1)]

    merges = spec["model"]["merges"]
    cases = {
        "cut": (record["json"][:len(record["json"]) // 2], "is not a byte-level BPE tokenizer.json"),
        "not json": ("hello", "is not a byte-level BPE tokenizer.json"),
        "gpt-4 digits": (variant(lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(
            Regex=SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,3}+"))), "split pattern is not prepare.py's"),
        "too many": (variant(more_specials), "more than the 65,536 that uint16 token files hold"),
        "gap": (variant(lambda s: s["added_tokens"][-1].update(id=VOCAB + 5)), "without gaps"),
        "no eot": (variant(lambda s: s["added_tokens"][0].update(content="<|bos|>")), "has no <|endoftext|>"),
        "merges swapped": (variant(lambda s: s["model"].update(merges=[merges[1], merges[0], *merges[2:]])),
                           "is not the one its ranks imply"),
        "merge missing": (variant(lambda s: s["model"].update(merges=merges[:-1])), "1 of its tokens are not made by a merge"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=message) as e:
            read_tokenizer(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value), name
    with pytest.raises(DataError, match="cannot read the tokenizer"):
        read_tokenizer(str(tmp_path / "missing"))


def test_a_data_directorys_tokenizer_is_checked_against_its_manifest(trained, tmp_path):
    record, _ = trained
    meta = {"tokenizer": {k: v for k, v in record.items() if k != "json"}}
    with pytest.raises(DataError, match="cannot read .*tokenizer.json"):
        data_tokenizer(str(tmp_path), meta)
    (tmp_path / "tokenizer.json").write_text(record["json"], encoding="utf-8")
    assert data_tokenizer(str(tmp_path), meta) == record
    (tmp_path / "tokenizer.json").write_text(record["json"].replace('"!"', '"?"', 1), encoding="utf-8")
    with pytest.raises(DataError, match="is not the tokenizer the manifest records"):
        data_tokenizer(str(tmp_path), meta)
    assert data_tokenizer(str(tmp_path), {"tokenizer": "gpt2"}) == GPT2  # format 1 (meta.json)
    with pytest.raises(DataError, match=r"uses the tokenizer gpt2, but B uses bpe-1024 \(sha256"):
        check_same(GPT2, record, "A", "B")


def test_vocab_size_0_is_the_datas_padded_to_a_multiple_of_64():
    cfg = TrainConfig()
    assert cfg.vocab_size == 0
    assert [with_vocab_size(cfg, n).vocab_size for n in (50257, 8192, 1000)] == [50304, 8192, 1024]
    assert with_vocab_size(TrainConfig(vocab_size=50304), 8192).vocab_size == 50304  # explicit: kept
    with pytest.raises(ConfigError, match="smaller than the data's vocabulary"):
        with_vocab_size(TrainConfig(vocab_size=4096), 8192)
    with pytest.raises(ConfigError, match="vocab_size must be positive"):
        from smallgpt.config import load_train_config
        load_train_config(["--vocab_size=-1"])


# -----------------------------------------------------------------------------
# Through the real scripts: prepare.py, train.py, sample.py, serve.py, eval.py, export.py

FAST = ["config/train_tiny.py", "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_iters=2", "--condensation_seqs=2", "--log_interval=1",
        "--compile=False", "--eval_interval=3", "--warmup_iters=2", "--lr_decay_iters=8", "--deterministic"]


def read_manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def one_line_error(result, *parts):
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert all(p in result.stderr for p in parts), result.stderr


def test_prepare_refuses_a_vocabulary_it_cannot_store_in_one_line(tmp_path):
    """--vocab_size past uint16, too small for the bytes and the specials, or given with --tokenizer."""
    for flags, message in [(["--vocab_size=65537"], "at most 65,536 (token files are uint16), not 65537"),
                           (["--vocab_size=200"], "must be above 267"),
                           (["--vocab_size=4096", "--tokenizer=gpt2"], "not both")]:
        result = run_script("data/fineweb/prepare.py", SAMPLE_PARQUET, f"--out_dir={tmp_path}", *flags, check=False)
        one_line_error(result, message)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, sample_parquet):
    """3,000 documents of the sample (100 held out) tokenized with a BPE that prepare.py trains on the train ones."""
    out = tmp_path_factory.mktemp("bpe") / "data"
    run_script("data/fineweb/prepare.py", sample_parquet, f"--out_dir={out}", "--max_docs=3000", "--val_docs=100",
               f"--vocab_size={VOCAB}", "--num_proc=2")
    return out


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, bpe_dir):
    """A tiny model trained 8 steps on bpe_dir."""
    out = tmp_path_factory.mktemp("bpe_run")
    run_script("train.py", *FAST, f"--data_dir={bpe_dir}", f"--out_dir={out}", "--max_iters=8")
    return out


@pytest.mark.slow
def test_prepare_trains_on_the_train_documents_and_tokenizes_with_it(bpe_dir, documents, tmp_path, sample_parquet):
    meta = read_manifest(bpe_dir)
    record = meta["tokenizer"]
    assert record["name"] == f"bpe-{VOCAB}" and meta["vocab_size"] == VOCAB and meta["eot_token"] == VOCAB - 11
    assert record["trained"]["documents"] == meta["splits"]["train"]["documents"] == 2900  # never a val document
    assert record["trained"]["bytes"] == meta["splits"]["train"]["bytes"]
    tokenizer = data_tokenizer(str(bpe_dir), meta)
    enc = get_tokenizer(tokenizer)
    val = np.fromfile(bpe_dir / "val_000000.bin", dtype=np.uint16).tolist()
    eot = [i for i, t in enumerate(val) if t == enc.eot_token] + [len(val)]
    texts = [enc.decode(val[a + 1:b]) for a, b in zip(eot, eot[1:])]  # every document follows an EOT
    assert len(texts) == 100 and set(texts) <= set(documents[:3000])
    # the same tokenizer for another directory: --tokenizer names a data directory (or its tokenizer.json)
    again = tmp_path / "again"
    run_script("data/fineweb/prepare.py", sample_parquet, f"--out_dir={again}", "--max_docs=3000", "--val_docs=100",
               f"--tokenizer={bpe_dir}", "--num_proc=1")
    for name in ("train_000000.bin", "val_000000.bin", "tokenizer.json"):
        assert (again / name).read_bytes() == (bpe_dir / name).read_bytes(), name
    # the directory keeps its tokenizer: the same command continues; another tokenizer is one line
    result = run_script("data/fineweb/prepare.py", sample_parquet, f"--out_dir={again}", "--max_docs=3000",
                        f"--tokenizer={bpe_dir / 'tokenizer.json'}")
    assert "added to" in result.stdout
    for flag in ("--tokenizer=gpt2", f"--vocab_size={2 * VOCAB}"):
        result = run_script("data/fineweb/prepare.py", sample_parquet, f"--out_dir={again}", flag, check=False)
        one_line_error(result, "keeps the tokenizer it was created with")


@pytest.mark.slow
def test_a_run_with_its_own_tokenizer_resumes_exactly(bpe_run, bpe_dir, tmp_path):
    """Stopped at step 5 and resumed == 8 steps at once, bit for bit; the checkpoint carries the tokenizer and its
    vocabulary is the tokenizer's (1,024, already a multiple of 64)."""
    part = tmp_path / "part"
    run_script("train.py", *FAST, f"--data_dir={bpe_dir}", f"--out_dir={part}", "--max_iters=5")
    result = run_script("train.py", *FAST, f"--data_dir={bpe_dir}", f"--out_dir={part}", "--max_iters=8",
                        "--init_from=resume")
    assert "resumed from" in result.stdout
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (bpe_run, part))
    assert a["iter_num"] == b["iter_num"] == 8 and a["model_args"]["vocab_size"] == VOCAB
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["tokenizer"]["json"] == (bpe_dir / "tokenizer.json").read_text(encoding="utf-8")
    assert a["tokenizer"]["sha256"] == read_manifest(bpe_dir)["tokenizer"]["sha256"]


@pytest.mark.slow
def test_sample_and_serve_give_the_same_text_with_its_own_tokenizer(bpe_run):
    """sample.py and serve.py read the tokenizer from the checkpoint alone (no data directory)."""
    testclient = pytest.importorskip("starlette.testclient")
    import serve
    opts = dict(temperature=0.9, top_k=50, seed=11, num_samples=2, max_new_tokens=20)
    prompt = "日本 and the 🚀 of"  # characters split across tokens
    result = run_script("sample.py", f"--out_dir={bpe_run}", f"--start={prompt}", "--device=cpu",
                        *[f"--{k}={v}" for k, v in opts.items()])
    expected = result.stdout.rstrip("\n").split("\n" + "-" * 15 + "\n")
    assert len(expected) == 2 and all(text.startswith(prompt) for text in expected)
    assert f"tokenizer bpe-{VOCAB}" in result.stderr
    cfg = serve.ServeConfig(out_dir=str(bpe_run), device="cpu")
    model, enc, device, dtype = serve.open_for_generation(cfg)
    client = testclient.TestClient(serve.make_app(serve.Engine(model, enc, device, dtype, 2), cfg, "tiny"))
    reply = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20, "n": 2, "temperature": 0.9,
                                                 "top_k": 50, "seed": 11}).json()
    assert [prompt + c["text"] for c in reply["choices"]] == expected


@pytest.mark.slow
def test_eval_and_export_with_its_own_tokenizer(bpe_run, bpe_dir, tmp_path):
    """eval.py scores with the checkpoint's tokenizer; export.py writes it (its logits check passes) and eval.py on
    the export finds it and gets the same val loss."""
    pytest.importorskip("transformers")
    common = [f"--data_dir={bpe_dir}", "--hellaswag=tests/fixtures/hellaswag_tiny.jsonl", "--log_metrics=False"]
    ours = run_script("eval.py", f"--model={bpe_run}", *common).stdout
    assert "| hellaswag | acc " in ours
    result = run_script("export.py", f"--model={bpe_run}", f"--out={tmp_path / 'hf'}")
    assert "check: transformers reproduces" in result.stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["eos_token_id"] == VOCAB - 11
    theirs = run_script("eval.py", f"--model={tmp_path / 'hf'}", *common).stdout
    val_rows = lambda out: [line for line in out.splitlines() if line.startswith("| val")]
    assert val_rows(ours) == val_rows(theirs) and len(val_rows(ours)) == 2


@pytest.mark.slow
def test_tokenizer_mismatches_are_one_line(bpe_run, bpe_dir, token_dir, tmp_path):
    """A checkpoint and a data directory of different tokenizers, in every script that has both; a damaged
    tokenizer.json in a data directory."""
    common = [*FAST, "--max_iters=10"]
    one_line_error(run_script("train.py", *common, f"--data_dir={token_dir}", f"--out_dir={bpe_run}",
                              "--init_from=resume", check=False), f"data_dir {token_dir} uses the tokenizer gpt2",
                   f"uses bpe-{VOCAB}")
    one_line_error(run_script("train.py", *common, f"--data_dir={token_dir}", f"--out_dir={tmp_path / 'new'}",
                              f"--init_from={bpe_run}", check=False), f"init_from={bpe_run} uses bpe-{VOCAB}")
    one_line_error(run_script("eval.py", f"--model={bpe_run}", f"--data_dir={token_dir}", "--hellaswag_items=0",
                              check=False), "uses the tokenizer gpt2")
    one_line_error(run_script("condensation.py", f"--out_dir={bpe_run}", f"--data_dir={token_dir}", "--which=last",
                              check=False), f"data_dir {token_dir} uses the tokenizer gpt2", f"uses bpe-{VOCAB}")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in bpe_dir.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "tokenizer.json").write_text("{}")
    one_line_error(run_script("train.py", *common, f"--data_dir={damaged}", f"--out_dir={tmp_path / 'x'}", check=False),
                   "is not the tokenizer the manifest records")
