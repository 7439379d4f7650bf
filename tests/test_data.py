import json

import numpy as np
import pytest

from gpt2fit.train.batches import WindowBatches
from gpt2fit.formats import open_split, read_meta
from gpt2fit.prepare import prepare
from gpt2fit.errors import UserError
from gpt2fit.prepare.tokenizers import build_char_tokenizer, train_bpe

DOCS = ["The first document.", "A second one, longer than the first.", "  ", "Third\nwith a newline."]


@pytest.fixture
def bpe_dir(tmp_path):
    tok = train_bpe(DOCS * 50, vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def _tokens(out, split="train"):
    meta = read_meta(out)
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]), meta


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_prepare_sources_append_eot_after_every_document(tmp_path, bpe_dir, kind):
    src = tmp_path / "src"
    src.mkdir()
    if kind == "txt":
        for i, d in enumerate(DOCS):
            (src / f"{i}.txt").write_text(d)
    elif kind == "jsonl":
        (src / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": DOCS}), src / "a.parquet")
    out = tmp_path / "out"
    meta = prepare([str(src)], str(out), tokenizer=str(bpe_dir), text_column="body", val_fraction=0.4,
                   seed=0, quiet=True)
    eot = meta["tokenizer"]["eot_id"]
    assert meta["source"]["documents"] == 3 and meta["source"]["empty_skipped"] == 1
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3
    assert min(meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) >= 1
    # decode document by document: exactly the non-empty inputs, each ended by EOT
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    decoded = []
    for split in ("train", "val"):
        ids, _ = _tokens(out, split)
        assert ids[-1] == eot
        docs = np.split(ids, np.where(ids == eot)[0] + 1)[:-1]
        assert len(docs) == meta["splits"][split]["documents"]
        decoded += [tok.decode(d[:-1]) for d in docs]
    assert sorted(decoded) == sorted(d for d in DOCS if d.strip())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 300


def test_missing_text_column_names_the_columns(tmp_path, bpe_dir):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(UserError, match=r"no text column 'text'; columns: \['content', 'id'\]"):
        prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), tokenizer=str(bpe_dir), quiet=True)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_empty_input_writes_nothing(tmp_path, bpe_dir):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="no text found"):
        prepare([str(tmp_path / "empty.txt")], str(tmp_path / "out"), tokenizer=str(bpe_dir), quiet=True)
    assert not any((tmp_path / "out").glob("*.bin"))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, bpe_dir):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok " * 20)
    (tmp_path / "b.txt").write_text("plain text " * 20)
    meta = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "out"),
                   tokenizer=str(bpe_dir), split="chars", val_fraction=0.2, quiet=True)
    assert meta["source"]["documents_with_replaced_bytes"] == 1


def test_char_tokenizer_round_trips_and_char_split(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
    tok = build_char_tokenizer(text)
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == len(set(text)) + 1  # + <|endoftext|>
    (tmp_path / "t.txt").write_text(text)
    meta = prepare([str(tmp_path / "t.txt")], str(tmp_path / "out"), tokenizer="char", split="chars",
                   val_fraction=0.1, quiet=True)
    cut = int(len(text) * 0.9)
    assert meta["splits"]["train"]["tokens"] == cut and meta["splits"]["val"]["tokens"] == len(text) - cut


def test_truncated_token_file_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("some text here " * 100)
    out = tmp_path / "out"
    prepare([str(tmp_path / "t.txt")], str(out), tokenizer="char", split="chars", val_fraction=0.1, quiet=True)
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        open_split(out, "train")


def test_prepare_refuses_to_overwrite(tmp_path):
    (tmp_path / "t.txt").write_text("some text here " * 100)
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "out"), tokenizer="char", split="chars", quiet=True)
    with pytest.raises(UserError, match="--overwrite"):
        prepare([str(tmp_path / "t.txt")], str(tmp_path / "out"), tokenizer="char", split="chars", quiet=True)


def test_window_batches_cover_each_window_once_per_epoch_and_are_deterministic():
    data = np.arange(1000, dtype=np.uint16)
    b = WindowBatches(data, block_size=10, micro_batch=4, seed=3)
    n = b.windows
    starts = np.concatenate([b.starts(k) for k in range(n // 4)])
    phase = starts[0] % 10
    assert len(set(starts.tolist())) == len(starts) and set((starts - phase) % 10) == {0}
    assert (starts + 11 <= len(data)).all()
    again = WindowBatches(data, block_size=10, micro_batch=4, seed=3)
    assert all((again.starts(k) == b.starts(k)).all() for k in (0, 5, 40, 1000))
    x, y = b[0]
    assert x.shape == (4, 10) and (y[:, :-1] == x[:, 1:]).all()
    # two ranks split the same global stream without overlap
    r0 = WindowBatches(data, 10, 2, seed=3, rank=0, world=2)
    r1 = WindowBatches(data, 10, 2, seed=3, rank=1, world=2)
    assert sorted(np.concatenate([r0.starts(0), r1.starts(0)]).tolist()) == sorted(b.starts(0).tolist())


def test_tiny_shakespeare_gpt2_token_counts_match_nanogpt(tmp_path):
    """nanoGPT's data/shakespeare/readme.md: 301,966 train and 36,059 val tokens (90/10 char split)."""
    from conftest import GPT2_TOKENIZER, SHAKESPEARE, need_shared

    meta = prepare([str(need_shared(SHAKESPEARE))], str(tmp_path / "out"), tokenizer=str(need_shared(GPT2_TOKENIZER)),
                   split="chars", val_fraction=0.1, quiet=True)
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]) == (301_966, 36_059)
    ids = np.fromfile(tmp_path / "out/train.bin", dtype=np.uint16)
    assert ids[:2].tolist() == [5962, 22307]  # "First Citizen"
    assert meta["source"]["eot_after_documents"] is False
