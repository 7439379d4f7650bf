"""gpt2fit.prepare: sources, tiktoken equivalence, parallel + resumable shards, bad input (CPU, offline)."""

import codecs
import errno
import json
import os
import random
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import gpt2fit.prepare.tokenizers as T
from gpt2fit import options
from gpt2fit.errors import UserError
from gpt2fit.formats import read_meta
from gpt2fit.prepare import command, prepare, shards
from gpt2fit.prepare.encode import GPT2_PAT, tiktoken_encoding, tiktoken_params
from gpt2fit.prepare.tokenizers import EOT, build_char_tokenizer, train_bpe

from conftest import GPT2_TOKENIZER, SHAKESPEARE, corpus_text, need_shared, run_cli

# text that stresses a byte-level BPE: unicode, emoji (ZWJ, skin tones, flags), combining marks,
# unicode whitespace, runs of spaces/newlines/tabs, contractions, digits, code
VARIED = [
    "Hello world", " leading space", "trailing space ", "  two leading", "tabs\tand\t\ttabs", "\n\n\nnewlines\n",
    "It's, we're, they've, I'm, you'll, he'd, 'S 'T", "naïve café résumé façade ÅNGSTRÖM ß ẞ ſ ǅ İı",
    "日本語のテキスト、中文文本，한국어 텍스트", "Русский текст и ελληνικά και עברית ועربية", "😀 👍🏽 🏳️‍🌈 🇺🇸 👨‍👩‍👧",
    "e\u0301 a\u0308 combining", "nbsp\u00a0thin\u2009ideographic\u3000line\u2028para\u2029zw\u200bbom\ufeff",
    "1234567890 3.14159 1e-9 ½ ⅔ ٣٤٥ 𝟙𝟚", "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n",
    "    indented = True\n\t\tif x != y:\n            pass\r\n", "a" * 300, " " * 50 + "x" + "\n" * 20,
    "<|endoftext|> is text here", "x<|endoftext|>y", "\x00\x01\x7f control \x1b[0m", "",
]


def fuzz_strings(n, seed=0):
    rng = random.Random(seed)
    pieces = VARIED + list("abcXYZ019 '\"!?.,;:-_/\\()[]{}<>\n\t\r") + ["'s", "'ll", "  ", "\u0085", "\u00a0"]
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            s = "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(1, 20)))
            s = s.encode("utf-8", "replace").decode("utf-8", "replace")  # no lone surrogates
        else:
            s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        out.append(s)
    return out


def hf_ordinary_ids(tok, texts):
    """The fast tokenizer's ids with special tokens treated as text (tiktoken's encode_ordinary)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    tk.encode_special_tokens = True
    return [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="session")
def bpe_tok():
    """The quickstart's kind of tokenizer: byte-level BPE trained with tokenizers (small vocab)."""
    text = corpus_text()
    return train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=600)


@pytest.fixture(scope="session")
def bpe_dir(bpe_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "bpe"
    bpe_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def docs():
    """~250 documents of varied size from the stdlib corpus, plus the VARIED strings."""
    rng = random.Random(1)
    text, out, i = corpus_text()[:200_000], [], 0
    while i < len(text):
        n = rng.randint(50, 1800)
        out.append(text[i:i + n])
        i += n
    out[5:5] = [v for v in VARIED if v.strip()]
    return out


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def read_split(out, split):
    meta = read_meta(out)
    return np.fromfile(Path(out) / f"{split}.bin", dtype=meta["dtype"])


def expected_splits(tok, texts, val_fraction, seed):
    """The contract, computed directly: non-empty docs in order, EOT after each, a seeded val draw per doc."""
    texts = [t for t in texts if t and not t.isspace()]
    eot = tok.convert_tokens_to_ids(EOT)
    is_val = np.random.default_rng(seed).random(len(texts)) < val_fraction
    ids = hf_ordinary_ids(tok, texts)
    out = {"train": [], "val": []}
    for x, v in zip(ids, is_val):
        out["val" if v else "train"] += x + [eot]
    return {k: np.array(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------
# tiktoken equivalence
# ------------------------------------------------------------------------------------------
def test_gpt2_tiktoken_ids_equal_the_fast_tokenizer_and_tiktokens_own_gpt2():
    need_shared(GPT2_TOKENIZER)
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    enc = tiktoken_encoding(tok)
    assert enc is not None, tiktoken_params(tok.backend_tokenizer.to_str())[1]
    texts = VARIED + fuzz_strings(3000) + SHAKESPEARE.read_text().split("\n\n")[:2000] + [corpus_text()[:100_000]]
    ours = [enc.encode_ordinary(t) for t in texts]
    assert ours == hf_ordinary_ids(tok, texts)
    plain = [t for t in texts if EOT not in t]  # without the special string: the tokenizer as users call it
    assert [enc.encode_ordinary(t) for t in plain] == [tok(t, add_special_tokens=False).input_ids for t in plain]
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    # tiktoken's gpt2, built by tiktoken's own loader from the local files (merges.txt is byte-identical
    # to OpenAI's vocab.bpe: the sha256 below is the one tiktoken_ext pins), with tiktoken's regex
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(GPT2_TOKENIZER / "merges.txt"), str(GPT2_TOKENIZER / "vocab.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")
    import tiktoken

    ref = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256},
                            explicit_n_vocab=50257)
    assert ours == [ref.encode_ordinary(t) for t in texts]
    assert tiktoken_params(tok.backend_tokenizer.to_str())[0]["mergeable_ranks"] == ranks


def test_tiktoken_get_encoding_gpt2_when_cached():
    import hashlib
    import tempfile

    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    urls = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]
    if not all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls):
        pytest.skip("tiktoken's gpt2 files are not in the local tiktoken cache (downloading needs the network)")
    import tiktoken
    from transformers import AutoTokenizer

    ref = tiktoken.get_encoding("gpt2")
    enc = tiktoken_encoding(AutoTokenizer.from_pretrained(need_shared(GPT2_TOKENIZER)))
    texts = VARIED + fuzz_strings(500)
    assert [enc.encode_ordinary(t) for t in texts] == [ref.encode_ordinary(t) for t in texts]


def test_quickstart_style_trained_bpe_is_eligible_with_identical_ids(bpe_tok):
    j = bpe_tok.backend_tokenizer.to_str()
    assert json.loads(j)["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                              "use_regex": True}
    enc = tiktoken_encoding(bpe_tok)
    assert enc is not None, tiktoken_params(j)[1]
    texts = VARIED + fuzz_strings(2000, seed=3) + [corpus_text()[:50_000]]
    assert [enc.encode_ordinary(t) for t in texts] == hf_ordinary_ids(bpe_tok, texts)


def test_eligibility_rules_and_split_regex_form():
    need_shared(GPT2_TOKENIZER)
    j = json.loads((GPT2_TOKENIZER / "tokenizer.json").read_text())
    # the same regex written as Split + ByteLevel(use_regex=False) is also GPT-2 style
    j2 = dict(j, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_PAT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]})
    params, why = tiktoken_params(json.dumps(j2))
    assert params is not None, why
    import tiktoken
    from tokenizers import Tokenizer

    enc, tk = tiktoken.Encoding(**params), Tokenizer.from_str(json.dumps(j2))
    tk.encode_special_tokens = True
    texts = VARIED + fuzz_strings(300, seed=5)
    assert [enc.encode_ordinary(t) for t in texts] == [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]
    # ineligible: a prefix space, a normalizer, a non-BPE model, merges whose ids do not follow merge order
    bad = {
        "prefix": dict(j, pre_tokenizer=dict(j["pre_tokenizer"], add_prefix_space=True)),
        "normalizer": dict(j, normalizer={"type": "NFC"}),
        "model": dict(j, model={"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}),
        "order": dict(j, model=dict(j["model"], merges=list(reversed(j["model"]["merges"])))),
    }
    for name, jj in bad.items():
        params, why = tiktoken_params(json.dumps(jj))
        assert params is None and why, name
    char = build_char_tokenizer("abc def")
    assert tiktoken_encoding(char) is None


# ------------------------------------------------------------------------------------------
# local sources, determinism, parallel workers
# ------------------------------------------------------------------------------------------
def test_output_is_the_contract_for_any_workers_and_chunking(tmp_path, bpe_tok, bpe_dir, docs):
    src = write_jsonl(tmp_path / "docs.jsonl", docs + ["", "   "])
    exp = expected_splits(bpe_tok, docs, 0.1, seed=4)
    runs = {}
    for name, kw in {"one": dict(workers=1), "many": dict(workers=2, chunk_chars=20_000)}.items():
        meta = prepare([str(src)], str(tmp_path / name), tokenizer=str(bpe_dir), val_fraction=0.1, seed=4,
                       quiet=True, **kw)
        runs[name] = meta
        for split in ("train", "val"):
            assert np.array_equal(read_split(tmp_path / name, split), exp[split]), (name, split)
        assert meta["encoder"]["kind"] == "tiktoken"
        assert meta["source"]["empty_skipped"] == 2 and meta["source"]["documents"] == len(docs)
        assert not (tmp_path / name / shards.SHARDS).exists()
    assert runs["many"]["encoder"]["chunks"] > 5 and runs["many"]["encoder"]["workers"] == 2
    assert runs["one"]["splits"] == runs["many"]["splits"]
    assert runs["one"]["tokenizer"]["fingerprint"] == runs["many"]["tokenizer"]["fingerprint"]


def test_fallback_encoder_for_char_tokenizer_and_special_string_is_text(tmp_path):
    texts = ["ab <|endoftext|> cd", "plain", "x<|endoftext|>"]
    src = write_jsonl(tmp_path / "d.jsonl", texts * 20)
    meta = prepare([str(src)], str(tmp_path / "out"), tokenizer="char", val_fraction=0.2, seed=0, quiet=True,
                   chunk_chars=100)
    assert meta["encoder"]["kind"] == "tokenizers" and "not BPE" in meta["encoder"]["note"]
    eot = meta["tokenizer"]["eot_id"]
    ids = np.concatenate([read_split(tmp_path / "out", s) for s in ("train", "val")])
    assert (ids == eot).sum() == 60  # only gpt2fit's own EOTs: the string in a document is characters


def test_csv_json_txt_sources_bad_bytes_and_empty_documents(tmp_path, bpe_dir, capsys):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.csv").write_bytes(b'id,body\n1,"multi\nline, with comma"\n2,""\n3,caf\xe9 latin-1\n4,plain row\n')
    (d / "b.json").write_text(json.dumps([{"body": "from a json array"}, {"body": None}]))
    (d / "c.jsonl").write_bytes(b'{"body": "ok"}\n{"body": "bad \xff byte"}\n{"body": "lone \\ud800 surrogate"}\n')
    (d / "d.txt").write_bytes(b"text file \xfe\n")
    (d / "e.txt").write_text("   \n")
    meta = prepare([str(d)], str(tmp_path / "out"), tokenizer=str(bpe_dir), text_column="body",
                   val_fraction=0.3, seed=2)
    src = meta["source"]
    assert src["documents"] == 8 and src["empty_skipped"] == 3  # csv "", json null, empty txt
    assert src["documents_with_replaced_bytes"] == 4  # csv \xe9, jsonl \xff, lone surrogate, txt \xfe
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    eot = meta["tokenizer"]["eot_id"]
    decoded = []
    for split in ("train", "val"):
        ids = read_split(tmp_path / "out", split)
        decoded += [tok.decode(x[:-1]) for x in np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]]
    assert "multi\nline, with comma" in decoded and "caf\ufffd latin-1" in decoded
    assert "lone \ufffd surrogate" in decoded and "bad \ufffd byte" in decoded
    out = capsys.readouterr().out
    assert "tokens/document" in out and "skipped 3 empty documents" in out and "4 documents had non-UTF-8" in out


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_missing_text_column_names_the_columns(tmp_path, bpe_dir, kind):
    p = tmp_path / f"a.{kind}"
    if kind == "csv":
        p.write_text("title,content\nx,y\n")
    elif kind == "jsonl":
        write_jsonl(p, ["y"], column="content")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": ["y"], "title": ["x"]}), p)
    with pytest.raises(UserError, match=r"no text column 'text'; columns: \[.*'content'.*\]\. Pass --text_column"):
        prepare([str(p)], str(tmp_path / "out"), tokenizer=str(bpe_dir), quiet=True)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_vocab_above_65535_writes_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab[EOT] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([EOT])
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOT, unk_token=EOT).save_pretrained(tmp_path / "tok")
    texts = ["w1 w65535 w65536", "w69999 w2", "w3 w66000 w4"] * 10
    meta = prepare([str(write_jsonl(tmp_path / "d.jsonl", texts))], str(tmp_path / "out"),
                   tokenizer=str(tmp_path / "tok"), val_fraction=0.3, seed=1, quiet=True)
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["vocab_size"] == 70_001
    ids = np.concatenate([read_split(tmp_path / "out", s) for s in ("train", "val")])
    assert ids.dtype == np.uint32 and {65535, 65536, 66000, 69999, 70_000} <= set(ids.tolist())


# ------------------------------------------------------------------------------------------
# Hub datasets, exercised on local dataset dirs (HF_HUB_OFFLINE=1)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def parquet_dataset(tmp_path, docs, monkeypatch):
    import datasets
    import pyarrow as pa

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # not ~/.cache
    import pyarrow.parquet as pq

    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    half = len(docs) // 2
    pq.write_table(pa.table({"text": docs[:half], "id": list(range(half))}), d / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[half:-20], "id": list(range(half, len(docs) - 20))}),
                   d / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[-20:], "id": list(range(20))}), d / "data" / "validation-00000-of-00001.parquet")
    return d


def test_dataset_source_own_val_split_streaming_and_max_tokens(tmp_path, bpe_tok, bpe_dir, parquet_dataset, docs):
    train_docs, val_docs = docs[:-20], docs[-20:]
    full = prepare(None, str(tmp_path / "full"), dataset=str(parquet_dataset), streaming=True,
                   val_split_name="validation", tokenizer=str(bpe_dir), chunk_chars=30_000, quiet=True)
    assert full["source"]["val_split"] == "validation" and full["source"]["streaming"]
    assert full["splits"]["val"]["documents"] == 20 and full["splits"]["train"]["documents"] == len(train_docs)
    eot = full["tokenizer"]["eot_id"]
    for split, texts in (("train", train_docs), ("val", val_docs)):
        exp = np.array([i for x in hf_ordinary_ids(bpe_tok, texts) for i in x + [eot]])
        assert np.array_equal(read_split(tmp_path / "full", split), exp)
    # auto finds the validation split; a builder + data_files, not streamed, reads the same documents
    auto = prepare(None, str(tmp_path / "auto"), dataset="parquet", val_split_name="auto",
                   dataset_data_files=[str(parquet_dataset / "data" / "train-*.parquet")],
                   tokenizer=str(bpe_dir), val_fraction=0.1, seed=3, quiet=True)
    assert auto["source"]["val_split"] is None  # data_files gives one split: fall back to a fraction
    exp = expected_splits(bpe_tok, train_docs, 0.1, seed=3)
    assert np.array_equal(read_split(tmp_path / "auto", "train"), exp["train"])
    # --max_tokens: a prefix of the full output, cut after the document that reaches the cap
    cap = full["splits"]["train"]["tokens"] // 3
    capped = prepare(None, str(tmp_path / "cap"), dataset=str(parquet_dataset), streaming=True,
                     val_split_name="validation", tokenizer=str(bpe_dir), chunk_chars=30_000, max_tokens=cap,
                     quiet=True)
    t_full, t_cap = read_split(tmp_path / "full", "train"), read_split(tmp_path / "cap", "train")
    assert cap <= len(t_cap) < cap + 2000 and t_cap[-1] == eot
    assert np.array_equal(t_full[: len(t_cap)], t_cap)
    val_cap = int(cap * 0.05)  # the source's own val split gets val_fraction of the cap
    assert val_cap <= capped["splits"]["val"]["tokens"] < full["splits"]["val"]["tokens"]
    assert capped["splits"]["train"]["documents"] == int((t_cap == eot).sum())


def test_dataset_errors_are_clear(tmp_path, parquet_dataset, bpe_dir):
    with pytest.raises(UserError, match=r"cannot reach the Hugging Face Hub for dataset 'nobody-xyz/no-such-set'"):
        prepare(None, str(tmp_path / "o"), dataset="nobody-xyz/no-such-set", tokenizer=str(bpe_dir))
    with pytest.raises(UserError, match=r"--dataset_split 'dev' is not a split .* splits: \['train', 'validation'\]"):
        prepare(None, str(tmp_path / "o"), dataset=str(parquet_dataset), dataset_split="dev", streaming=True)
    with pytest.raises(UserError, match=r"--val_split_name 'test' is not a split"):
        prepare(None, str(tmp_path / "o"), dataset=str(parquet_dataset), val_split_name="test", streaming=True)
    with pytest.raises(UserError, match=r"dataset '.*' split 'train': no text column 'body'; columns: \['id', 'text'\]"):
        prepare(None, str(tmp_path / "o"), dataset=str(parquet_dataset), text_column="body", streaming=True)
    with pytest.raises(UserError, match=r"--dataset_config 'nope' is not a config"):
        prepare(None, str(tmp_path / "o"), dataset=str(parquet_dataset), dataset_config="nope", streaming=True)
    with pytest.raises(UserError, match="exactly one source"):
        prepare(["x.txt"], str(tmp_path / "o"), dataset="y")


class _Hub(BaseHTTPRequestHandler):
    """Answers every request like the Hub does for a missing (404) or gated (401) repository."""

    status, code = 404, "RepoNotFound"

    def _answer(self):
        body = json.dumps({"error": "Repository not found" if self.status == 404 else "Access restricted"}).encode()
        self.send_response(self.status)
        self.send_header("X-Error-Code", self.code)
        self.send_header("X-Error-Message", "Repository not found" if self.status == 404 else "gated")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status,code", [(404, "RepoNotFound"), (401, "GatedRepo")])
def test_hub_missing_or_gated_dataset_is_a_user_error(tmp_path, status, code):
    handler = type("H", (_Hub,), {"status": status, "code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = run_cli("prepare", "--dataset", "someone/private-set", "--out_dir", tmp_path / "o", timeout=120,
                    env={"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
                         "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_CACHE": str(tmp_path / "hub"),
                         "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"})
    finally:
        server.shutdown()
    assert r.returncode == 2, r.stderr[-2000:]
    first = r.stderr.strip().splitlines()[0]
    assert first.startswith("error: dataset 'someone/private-set' was not found on the Hugging Face Hub, or it "
                            "needs a login"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "hf auth login" in r.stderr


# ------------------------------------------------------------------------------------------
# resume, full disk
# ------------------------------------------------------------------------------------------
def test_resume_after_the_process_dies_reuses_completed_chunks(tmp_path, bpe_dir, docs, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    args = ["--input", src, "--tokenizer", bpe_dir, "--chunk_chars", "20000", "--val_fraction", "0.1", "--quiet"]
    ref = prepare([str(src)], str(tmp_path / "ref"), tokenizer=str(bpe_dir), chunk_chars=20_000,
                  val_fraction=0.1, quiet=True, workers=1)
    out = tmp_path / "out"
    r = run_cli("prepare", *args, "--out_dir", out, "--workers", "2", env={shards.CRASH_ENV: "3"}, timeout=180)
    assert r.returncode == 3, r.stderr[-2000:]  # died without cleanup, its worker processes with it
    done = sorted(p.name[: -len(".done")] for p in (out / shards.SHARDS).glob("*.done"))
    assert len(done) >= 3 and not (out / "meta.json").exists() and not (out / "train.bin").exists()
    redone = []
    real = shards.tokenize_chunk
    monkeypatch.setattr(shards, "tokenize_chunk", lambda name, *a: redone.append(name) or real(name, *a))
    meta = prepare([str(src)], str(out), tokenizer=str(bpe_dir), chunk_chars=20_000, val_fraction=0.1,
                   quiet=True, workers=1)  # same arguments (workers and quiet are not part of the key)
    assert not set(redone) & set(done) and len(redone) == ref["encoder"]["chunks"] - len(done)
    assert meta["encoder"]["chunks_resumed"] == len(done)
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == (tmp_path / "ref" / f"{split}.bin").read_bytes()
    assert meta["splits"] == ref["splits"] and not (out / shards.SHARDS).exists()


def test_changed_arguments_start_over(tmp_path, bpe_dir, docs, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    monkeypatch.setenv(shards.CRASH_ENV, "1")
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit):
        prepare([str(src)], str(tmp_path / "o"), tokenizer=str(bpe_dir), chunk_chars=20_000, quiet=True, workers=1)
    monkeypatch.delenv(shards.CRASH_ENV)
    meta = prepare([str(src)], str(tmp_path / "o"), tokenizer=str(bpe_dir), chunk_chars=20_000, seed=99,
                   quiet=True, workers=1)
    assert meta["encoder"]["chunks_resumed"] == 0  # another seed: the old shards are not reused


def test_disk_full_marks_no_incomplete_chunk_and_resumes(tmp_path, bpe_dir, docs, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    real, calls = shards.formats.write_atomic, []

    def full_on_second_chunk(path, data):
        calls.append(path.name)
        if path.name.startswith("d000001."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(shards.formats, "write_atomic", full_on_second_chunk)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"cannot write .*d000001.*: No space left on device \(disk full\?\)"):
        prepare([str(src)], str(out), tokenizer=str(bpe_dir), chunk_chars=20_000, quiet=True, workers=1)
    shard_dir = out / shards.SHARDS
    assert (shard_dir / "d000000.done").exists() and not (shard_dir / "d000001.done").exists()
    assert not (shard_dir / "d000001.train.bin").exists() and not (out / "meta.json").exists()
    monkeypatch.setattr(shards.formats, "write_atomic", real)
    meta = prepare([str(src)], str(out), tokenizer=str(bpe_dir), chunk_chars=20_000, quiet=True, workers=1)
    assert meta["encoder"]["chunks_resumed"] == 1


def test_real_full_disk_on_a_tiny_tmpfs(tmp_path, bpe_dir):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a 1 MB tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        text = corpus_text()
        src = write_jsonl(tmp_path / "d.jsonl", [text[i:i + 3000] for i in range(0, len(text), 3000)] * 3)
        with pytest.raises(UserError, match=r"No space left on device \(disk full\?\)"):
            prepare([str(src)], str(mnt / "out"), tokenizer="char", chunk_chars=100_000, quiet=True, workers=1)
        shard_dir = mnt / "out" / shards.SHARDS
        for marker in shard_dir.glob("*.done"):  # every chunk marked complete is complete
            m = json.loads(marker.read_text())
            name = marker.name[: -len(".done")]
            for split in ("train", "val"):
                f = shard_dir / f"{name}.{split}.bin"
                assert (f.stat().st_size if f.exists() else 0) == m[f"{split}_tokens"] * 2  # uint16
        assert not (mnt / "out" / "meta.json").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------
# tokenizer training, CLI
# ------------------------------------------------------------------------------------------
def test_bpe_training_streams_a_bounded_sample(tmp_path, docs, monkeypatch):
    seen = {}
    real = T.train_bpe

    def spy(texts, vocab_size, **kw):
        assert not isinstance(texts, (list, tuple))  # an iterator, never the corpus in memory

        def counted():
            for t in texts:
                seen["n"] = seen.get("n", 0) + 1
                yield t
        return real(counted(), vocab_size, **kw)

    monkeypatch.setattr(T, "train_bpe", spy)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    meta = prepare([str(src)], str(tmp_path / "o"), tokenizer="bpe", vocab_size=300, tokenizer_train_docs=40,
                   quiet=True, workers=1)
    assert seen["n"] == 40 and meta["source"]["tokenizer_train_docs"] == 40
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["vocab_size"] == 300
    assert meta["encoder"]["kind"] == "tiktoken"


def test_every_cli_flag_has_help():
    p = options.make_parser(command.PROG, command.SECTIONS, description=command.DESCRIPTION)
    for action in p._actions:
        if action.dest != "help":
            assert action.help and action.help != "==SUPPRESS==", action.dest


def test_cli_flags_reach_prepare_and_counts_take_the_same_forms_as_training():
    """The README's `--max_tokens 10B` once failed here: prepare parsed counts with int(float())."""
    import inspect

    base = ["--input", "x", "--out_dir", "o"]
    for text, n in (("10B", 10**10), ("2.5M", 2_500_000), ("1e9", 10**9), ("300k", 300_000)):
        assert command.parse_args(base + ["--max_tokens", text])["max_tokens"] == n
    params = inspect.signature(prepare).parameters
    defaults = command.parse_args(base)
    assert set(defaults) == set(params)  # every flag is an argument of prepare(), and the reverse
    assert all(defaults[k] == params[k].default for k in params if k not in ("inputs", "out_dir"))
    kw = command.parse_args(base + ["--no_tiktoken", "--no_resume", "--streaming", "--quiet", "--workers", "3",
                                    "--chunk_chars", "20k", "--tokenizer_train_chars", "none", "--input", "a", "b"])
    assert (kw["use_tiktoken"], kw["resume"], kw["streaming"], kw["quiet"]) == (False, False, True, True)
    assert (kw["workers"], kw["chunk_chars"], kw["tokenizer_train_chars"]) == (3, 20_000, None)
    assert kw["inputs"] == ["x", "a", "b"]  # a repeated --input adds to the list


@pytest.mark.parametrize("argv,match", [
    (["--max_tokens", "0"], "--max_tokens='0' must be positive"),
    (["--max_tokens", "nan"], "--max_tokens: cannot read count 'nan'"),
    (["--chunk_chars", "1.5"], "--chunk_chars: count '1.5' is not a whole number"),
    (["--val_fraction", "inf"], "val_fraction=inf .* not a finite number"),
    (["--val_fraction", "1.5"], "val_fraction=1.5 must be between 0 and 1"),
    (["--split", "lines"], "split='lines' .* not one of documents, chars"),
    (["--workers", "0"], "workers=0 must be a positive integer"),
    (["--max_token", "5"], "unknown flag --max_token. Did you mean 'max_tokens'"),
])
def test_bad_cli_values_are_refused_up_front(tmp_path, argv, match):
    with pytest.raises(UserError, match=match):
        command.main(["--input", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "o"), *argv])
    assert not (tmp_path / "o").exists()


def test_out_dir_is_required():
    with pytest.raises(UserError, match="--out_dir is required"):
        command.main(["--input", "stdlib"])


# ------------------------------------------------------------------------------------------
# bad input through the CLI (issue #14): exit 2, a first line `error:` naming the file, nothing
# written to a new out dir and nothing changed in an existing one
# ------------------------------------------------------------------------------------------
def tree(root):
    """Every path under root with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(Path(root).rglob("*"))}


def refused(p, *words):
    first = (p.stderr.splitlines() or [""])[0]
    assert p.returncode == 2 and first.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert all(w in first for w in words), first
    return first


BOM_TEXT = "PowerShell wrote this: naïve café, 日本語, emoji 😀 (outside the BMP).\r\nSecond line.\n"


def test_text_with_a_utf16_or_utf32_bom_gives_the_tokens_of_the_same_text_in_utf8(tmp_path):
    """PowerShell's `>` writes UTF-16 LE with a BOM: every other byte NUL, once tokenized as such."""
    files = {"a.txt": ("utf-16-le", codecs.BOM_UTF16_LE), "b.md": ("utf-16-be", codecs.BOM_UTF16_BE),
             "c.py": ("utf-32-le", codecs.BOM_UTF32_LE), "d.txt": ("utf-32-be", codecs.BOM_UTF32_BE),
             "e.txt": ("utf-8", codecs.BOM_UTF8), "f.jsonl": ("utf-16-le", codecs.BOM_UTF16_LE),
             "g.csv": ("utf-16-le", codecs.BOM_UTF16_LE), "h.json": ("utf-8", codecs.BOM_UTF8)}
    records = [{"text": f"{BOM_TEXT} record {i}"} for i in range(3)]
    content = {".jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
               ".json": json.dumps(records, ensure_ascii=False),
               ".csv": "text,n\n" + "".join(f'"{r["text"]}",{i}\n' for i, r in enumerate(records))}
    for d in ("utf8", "bom"):
        (tmp_path / d).mkdir()
    for name, (enc, bom) in files.items():
        text = content.get(Path(name).suffix, f"{BOM_TEXT} file {name}")
        (tmp_path / "utf8" / name).write_bytes(text.encode("utf-8"))
        (tmp_path / "bom" / name).write_bytes(bom + text.encode(enc))
    for d in ("utf8", "bom"):
        p = run_cli("prepare", "--input", tmp_path / d, "--out_dir", tmp_path / f"out_{d}", "--tokenizer", "char",
                    "--val_fraction", "0.3", "--seed", "3", "--quiet")
        assert p.returncode == 0, p.stderr
    ref, got = read_meta(tmp_path / "out_utf8"), read_meta(tmp_path / "out_bom")
    assert got["source"]["decoded_from_bom"] == 8 and ref["source"]["decoded_from_bom"] == 0
    assert got["tokenizer"]["fingerprint"] == ref["tokenizer"]["fingerprint"]  # no NUL, no U+FEFF: the same chars
    assert got["source"]["documents"] == ref["source"]["documents"] == 14
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "out_bom", split), read_split(tmp_path / "out_utf8", split))


def test_binary_files_are_skipped_in_a_directory_and_refused_when_named(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "guide.md").write_text("# Guide\nSome text to train on.\n" * 20)
    (d / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    (d / "site.zip").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(64))
    (d / "weights.bin").write_bytes(np.arange(300, dtype=np.uint16).tobytes())
    p = run_cli("prepare", "--input", d, "--out_dir", tmp_path / "out", "--tokenizer", "char", "--split", "chars")
    assert p.returncode == 0, p.stderr
    src = read_meta(tmp_path / "out")["source"]
    assert (src["files"], src["binary_skipped"]) == (1, 3) and "3 binary files" in p.stdout
    assert "\x00" not in (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
    before = tree(tmp_path)
    for spec in (d / "logo.png", d / "*.bin"):
        p = run_cli("prepare", "--input", spec, "--out_dir", tmp_path / "new", "--tokenizer", "char")
        assert "binary" in refused(p, str(spec))
    assert tree(tmp_path) == before


MALFORMED = {  # file, its bytes, what the error names besides the file
    "array": ("truncated.json", b'[{"text": "a"}, {"text": "b"', "line 1 column 29"),
    "parquet": ("fake.parquet", b"this is not Parquet, just text saved as .parquet", "Parquet"),
    "jsonl_line": ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', "line 2, column 13"),
    "late_jsonl_line": ("late.jsonl", b"".join(b'{"text": "document %d of many"}\n' % i for i in range(400))
                        + b'{"text": "cut off\n', "line 401"),
    "csv_row": ("bad.csv", b'text,n\n"a",1\n"b",2,3\n', "Expected 2 columns, got 3"),
    "utf16_damaged": ("odd.txt", codecs.BOM_UTF16_LE + "text".encode("utf-16-le") + b"\x00\xd8", "position 10-11"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_name_the_file_and_position_and_leave_nothing(tmp_path, bpe_dir, case):
    """With a pretrained tokenizer the shards are written while the file is read: a late error too
    must leave nothing behind (the fixed file has another key, so they are of no use)."""
    name, data, where = MALFORMED[case]
    (tmp_path / name).write_bytes(data)
    before = tree(tmp_path)
    p = run_cli("prepare", "--input", tmp_path / name, "--out_dir", tmp_path / "out", "--tokenizer", bpe_dir,
                "--chunk_chars", "1000", "--workers", "1")
    refused(p, name, where)
    assert tree(tmp_path) == before


def test_a_bad_file_leaves_prepared_data_as_it_was_even_with_overwrite(tmp_path, bpe_dir):
    name, data, where = MALFORMED["late_jsonl_line"]
    (tmp_path / name).write_bytes(data)
    write_jsonl(tmp_path / "good.jsonl", [f"good document {i}" for i in range(50)])
    prepare([str(tmp_path / "good.jsonl")], str(tmp_path / "out"), tokenizer=str(bpe_dir), val_fraction=0.2, quiet=True)
    before = tree(tmp_path)
    p = run_cli("prepare", "--input", tmp_path / name, "--out_dir", tmp_path / "out", "--tokenizer", bpe_dir,
                "--chunk_chars", "1000", "--workers", "1", "--overwrite")
    refused(p, name, where)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["out_is_a_file", "out_under_a_file", "out_is_a_run", "out_has_checkpoints",
                                  "input_dir_missing"])
def test_paths_of_the_wrong_kind_are_refused_before_anything_is_written(tmp_path, case):
    (tmp_path / "text.txt").write_text("some text to prepare\n" * 50)
    (tmp_path / "notes").write_text("a file, not a directory")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    if case == "out_is_a_run":
        (run / "config.yaml").write_text("max_steps: 10\n")
        (run / "metrics.jsonl").write_text("")
    src, out, words = {
        "out_is_a_file": ("text.txt", "notes", ["notes", "is a file, not a directory"]),
        "out_under_a_file": ("text.txt", "notes/data", ["notes", "is a file, not a directory"]),
        "out_is_a_run": ("text.txt", "run", ["run", "training run directory"]),
        "out_has_checkpoints": ("text.txt", "run", ["run", "training run directory"]),
        "input_dir_missing": ("corpus/", "out", ["corpus/", "does not exist"]),
    }[case]
    before = tree(tmp_path)
    p = run_cli("prepare", "--input", src, "--out_dir", out, "--tokenizer", "char", "--overwrite", cwd=tmp_path)
    refused(p, *words)
    assert tree(tmp_path) == before
